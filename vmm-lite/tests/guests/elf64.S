/*
 * Tiny 64-bit guest entered through the Linux 64-bit boot protocol: long mode, the VMM's
 * identity map, %rsi = boot_params. Writes the boot-timer marker first, prints a banner and
 * the kernel command line to COM1, then stops:
 *   default            i8042 reset (VMM exits 0)
 *   -DEXIT_STATUS=N    writes N to the debug exit port (VMM exits N)
 *   -DTRIPLE_FAULT     empty IDT + ud2 -> triple fault (KVM_EXIT_SHUTDOWN)
 *   -DBAD_MMIO         pokes unmapped MMIO and ports first (must be contained)
 *   -DSPIN             spins forever after the marker (for signal tests)
 *   -DLINUX_BANNER     embeds a "Linux version" banner, so the VMM takes it for Linux
 */
#include "common.h"
        .code64
        .text
        .globl _start
_start:
        movl    $BOOT_TIMER, %edi       /* boot-timer marker: the first thing the guest does */
        movb    $BOOT_TIMER_MAGIC, (%rdi)
        mov     %rsi, %rbx              /* keep boot_params */
        mov     $COM1, %dx
        lea     banner(%rip), %rsi
        call    puts
        mov     BP_CMD_LINE_PTR(%rbx), %esi
        call    puts
        mov     $'\n', %al
        out     %al, %dx
#ifdef BAD_MMIO
        movl    $0xdead0000, %edi
        movl    (%rdi), %eax
        movl    %eax, 8(%rdi)
        in      $0x99, %al
        out     %al, $0x99
#endif
#ifdef SPIN
3:      pause
        jmp     3b
#endif
#if defined(EXIT_STATUS)
        mov     $EXIT_STATUS, %al
        mov     $EXIT_PORT, %dx
        out     %al, %dx
#elif defined(TRIPLE_FAULT)
        lidt    zero_idt(%rip)
        ud2
#else
        mov     $I8042_RESET, %al
        out     %al, $I8042_CMD
#endif
1:      hlt
        jmp     1b

/* puts: write the NUL-terminated string at %rsi to port %dx. */
puts:
        lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     puts
2:      ret

banner: .asciz  "elf64 guest: cmdline="
#ifdef LINUX_BANNER
        .asciz  "Linux version 6.1.0-fake (test@sandscope) #1 SMP"
#endif
        .align 8
zero_idt:
        .word   0
        .quad   0
