/*
 * Entry for C guests: 64-bit boot protocol (long mode, identity map, %rsi = boot_params).
 * Sets a stack, writes the boot-timer marker, calls guest_main(boot_params) and stops
 * through the i8042 reset, or the debug exit port with guest_main's non-zero return.
 */
#include "common.h"
        .code64
        .text
        .globl _start
_start:
        lea     stack_top(%rip), %rsp
        movl    $BOOT_TIMER, %eax
        movb    $BOOT_TIMER_MAGIC, (%rax)
        mov     %rsi, %rdi
        call    guest_main
        test    %eax, %eax
        jnz     1f
        mov     $I8042_RESET, %al
        out     %al, $I8042_CMD
        jmp     2f
1:      mov     $EXIT_PORT, %dx
        out     %al, %dx
2:      hlt
        jmp     2b

        .bss
        .align  16
        .space  16384
stack_top:
