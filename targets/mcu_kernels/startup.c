/* Bare-metal start of the Cortex-M test image (graphopt's emulator check): the vector
 * table, copying .data from flash, zeroing .bss, enabling the FPU, then main() with
 * newlib's semihosting I/O (rdimon) and exit() back to the emulator. */
#include <stdlib.h>

extern unsigned long _sidata, _sdata, _edata, _sbss, _ebss;
/* The initial stack pointer, the table's first entry. The linker script defines the
 * symbol; declared as a function so the table needs no object-to-function pointer cast
 * (which ISO C forbids). */
extern void graphopt_stack_top(void);
extern void initialise_monitor_handles(void);
extern int main(void);

void Reset_Handler(void);
void Default_Handler(void);

void Default_Handler(void)
{
    exit(3); /* a fault: report it as a failed run rather than hang */
}

__attribute__((section(".vectors"), used))
void (*const graphopt_vectors[16])(void) = {
    graphopt_stack_top, Reset_Handler, Default_Handler, Default_Handler,
    Default_Handler, Default_Handler, Default_Handler, 0, 0, 0, 0,
    Default_Handler, Default_Handler, 0, Default_Handler, Default_Handler,
};

void Reset_Handler(void)
{
    unsigned long *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata)
        *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;
#if defined(__ARM_FP)
    *(volatile unsigned long *)0xE000ED88UL |= 0xFUL << 20; /* CPACR: CP10, CP11 full */
    __asm__ volatile("dsb\n\tisb");
#endif
    initialise_monitor_handles();
    exit(main());
}

/* newlib's exit() runs _fini; this image has no C++ destructors */
void _init(void);
void _fini(void);
void _init(void) {}
void _fini(void) {}
