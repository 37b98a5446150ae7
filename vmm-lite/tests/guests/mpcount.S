/*
 * Tiny 64-bit guest that finds the MP floating pointer in the last KiB of conventional
 * memory, checks both checksums and counts the enabled processor entries. The count is
 * written to the debug exit port, so it becomes the VMM's exit status (100: no table,
 * 101: bad checksum).
 */
#include "common.h"
        .code64
        .text
        .globl _start
_start:
        movl    $BOOT_TIMER, %edi
        movb    $BOOT_TIMER_MAGIC, (%rdi)
        mov     $0x9fc00, %esi          /* scan 0x9fc00..0xa0000 in 16-byte steps */
1:      cmpl    $0x5f504d5f, (%rsi)     /* "_MP_" */
        je      2f
        add     $16, %esi
        cmp     $0xa0000, %esi
        jb      1b
        mov     $100, %al
        jmp     done
2:      mov     %esi, %edi              /* floating pointer checksum over 16 bytes */
        mov     $16, %ecx
        call    sum
        jnz     bad
        mov     4(%rsi), %esi           /* config table */
        movzwl  4(%rsi), %ecx           /* base table length */
        mov     %esi, %edi
        call    sum
        jnz     bad
        movzwl  34(%rsi), %ecx          /* entry count */
        lea     44(%rsi), %rdi
        xor     %edx, %edx              /* enabled processors */
3:      test    %ecx, %ecx
        jz      5f
        cmpb    $0, (%rdi)
        jne     4f
        testb   $1, 3(%rdi)
        jz      31f
        inc     %edx
31:     add     $20, %rdi
        dec     %ecx
        jmp     3b
4:      add     $8, %rdi
        dec     %ecx
        jmp     3b
5:      mov     %dl, %al
        jmp     done
bad:    mov     $101, %al
done:   mov     $EXIT_PORT, %dx
        out     %al, %dx
6:      hlt
        jmp     6b

/* sum: add %ecx bytes at %rdi into %al; ZF set when the sum is zero. */
sum:    xor     %eax, %eax
7:      add     (%rdi), %al
        inc     %rdi
        dec     %ecx
        jnz     7b
        test    %al, %al
        ret
