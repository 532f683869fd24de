"""A TVM RPC server that needs only the TVM runtime (no compiler library, no cloudpickle).

``python -m tvm.exec.rpc_server`` starts its server in a helper process through
``cloudpickle``, and its default build of uploaded ``.tar`` files needs a compiler on the
device. This script serves the same protocol from the process itself, so it runs where
only ``numpy`` and TVM's runtime are installed: a small board, or the aarch64 sysroot
under qemu-user (``graphopt.targets.tvm_sysroot``). Standalone on purpose: it imports
neither graphopt nor the TVM compiler::

    TVM_USE_RUNTIME_LIB=1 python3 tvm_rpc_server.py --host 0.0.0.0 --port 9090
    TVM_USE_RUNTIME_LIB=1 python3 tvm_rpc_server.py --tracker HOST:9190 --key rpi4

graphopt uploads linked shared libraries (``model.so``, tuning candidates linked on the
host), so nothing is compiled on the device. Like TVM's own server it executes whatever
a client uploads: run it on a trusted network only.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tvm_rpc_server.py", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9090, help="first port to try")
    parser.add_argument("--port-end", type=int, default=9199, help="last port to try + 1")
    parser.add_argument("--tracker", help="register with the RPC tracker at HOST:PORT")
    parser.add_argument("--key", default="", help="device key at the tracker")
    parser.add_argument("--custom-addr", help="address the tracker hands to clients")
    parser.add_argument("--silent", action="store_true", help="log errors only")
    args = parser.parse_args(argv)
    if args.tracker and not args.key:
        parser.error("--tracker needs --key (the device kind clients ask the tracker for)")
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    from tvm.rpc import server

    tracker = None
    if args.tracker:
        host, port = args.tracker.rsplit(":", 1)
        tracker = (host, int(port))
    # What rpc.Server runs in its helper process: a listening socket and the accept /
    # serve loop in a thread (each session is served in a forked child).
    state = server.PopenRPCServerState(args.host, args.port, args.port_end,
                                       tracker_addr=tracker, key=args.key,
                                       custom_addr=args.custom_addr, silent=args.silent)
    print(f"TVM RPC server listening on {args.host}:{state.port}", flush=True)
    state.thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
