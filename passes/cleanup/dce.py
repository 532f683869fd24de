"""Dead-code elimination: nodes whose outputs nobody reads, initializers nobody uses."""

from __future__ import annotations

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult


class EliminateDeadCode(Pass):
    """Remove nodes that do not contribute to a graph output and unused initializers."""

    name = "eliminate-dead-code"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        nodes_before = model.num_nodes()
        inits_before = len(model.initializers())
        # Graph inputs are the model's interface: never removed, even when unused.
        model.graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True,
                            recurse_functions=True)
        removed_nodes = nodes_before - model.num_nodes()
        removed_inits = inits_before - len(model.initializers())
        return PassResult(changed=bool(removed_nodes or removed_inits),
                          stats={"nodes_removed": removed_nodes,
                                 "initializers_removed": removed_inits})
