/*
 * Tiny 64-bit guest that prints the CPUID leaves a Linux guest relies on to COM1, one line
 * per leaf/subleaf: "LLLLLLLL.SSSSSSSS EAX EBX ECX EDX" in hex, then checks the hypervisor
 * signature at 0x40000000 itself and exits through the debug exit port:
 *   0  "KVMKVMKVM\0\0\0" found
 *   3  signature missing or wrong
 * The test parses the lines and checks topology, feature bits and vendor leaves.
 */
#include "common.h"
        .code64
        .text
        .globl _start
_start:
        movl    $BOOT_TIMER, %edi
        movb    $BOOT_TIMER_MAGIC, (%rdi)
        lea     leaves(%rip), %rbp
1:      mov     (%rbp), %eax
        cmp     $0xffffffff, %eax
        je      2f
        mov     4(%rbp), %ecx
        mov     %eax, %r8d
        mov     %ecx, %r9d
        cpuid
        mov     %eax, %r10d
        mov     %ebx, %r11d
        mov     %ecx, %r12d
        mov     %edx, %r13d
        mov     %r8d, %eax
        call    hex32
        mov     $'.', %al
        out     %al, %dx
        mov     %r9d, %eax
        call    hex32
        mov     %r10d, %eax
        call    sphex32
        mov     %r11d, %eax
        call    sphex32
        mov     %r12d, %eax
        call    sphex32
        mov     %r13d, %eax
        call    sphex32
        mov     $'\n', %al
        out     %al, %dx
        add     $8, %rbp
        jmp     1b
2:      mov     $0x40000000, %eax
        xor     %ecx, %ecx
        cpuid
        mov     $3, %al
        cmp     $0x4b4d564b, %ebx       /* "KVMK" */
        jne     done
        cmp     $0x564b4d56, %ecx       /* "VMKV" */
        jne     done
        cmp     $0x0000004d, %edx       /* "M\0\0\0" */
        jne     done
        xor     %al, %al
done:   mov     $EXIT_PORT, %dx
        out     %al, %dx
3:      hlt
        jmp     3b

/* sphex32: a space, then %eax as 8 hex digits. */
sphex32:
        mov     %eax, %esi
        mov     $COM1, %dx
        mov     $' ', %al
        out     %al, %dx
        mov     %esi, %eax
/* hex32: %eax as 8 hex digits to COM1; leaves %dx = COM1. Clobbers eax, ecx, esi. */
hex32:
        mov     %eax, %esi
        mov     $8, %ecx
        mov     $COM1, %dx
4:      rol     $4, %esi
        mov     %esi, %eax
        and     $0xf, %eax
        cmp     $10, %al
        jb      5f
        add     $('a' - '0' - 10), %al
5:      add     $'0', %al
        out     %al, %dx
        dec     %ecx
        jnz     4b
        ret

        .align 4
leaves: /* leaf, subleaf */
        .long   0, 0
        .long   1, 0
        .long   4, 0
        .long   4, 1
        .long   4, 2
        .long   4, 3
        .long   0xb, 0
        .long   0xb, 1
        .long   0xb, 2
        .long   0x1f, 0
        .long   0x1f, 1
        .long   0x1f, 2
        .long   0x40000000, 0
        .long   0x40000001, 0
        .long   0x80000000, 0
        .long   0x80000001, 0
        .long   0x80000008, 0
        .long   0x8000001d, 0
        .long   0x8000001d, 3
        .long   0x8000001e, 0
        .long   0xffffffff, 0
