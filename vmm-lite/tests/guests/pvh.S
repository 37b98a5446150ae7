/*
 * Tiny PVH guest: the ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18) gives the 32-bit entry.
 * Entered in 32-bit protected mode, paging off, %ebx = hvm_start_info. Writes the boot-timer
 * marker, checks the start_info magic, prints a banner and the command line and resets
 * through the i8042.
 */
#include "common.h"
        .section .note.Xen, "a"
        .align 4
        .long   4                       /* namesz */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .align 4
        .long   pvh_start

        .text
        .code32
        .globl _start
_start:
pvh_start:
        movb    $BOOT_TIMER_MAGIC, BOOT_TIMER
        mov     $COM1, %dx
        cmpl    $0x336ec578, (%ebx)     /* XEN_HVM_START_MAGIC */
        jne     bad
        mov     $banner, %esi
        call    puts
        mov     PVH_CMDLINE(%ebx), %esi
        call    puts
        mov     $'\n', %al
        out     %al, %dx
        mov     $I8042_RESET, %al
        out     %al, $I8042_CMD
1:      hlt
        jmp     1b
bad:
        mov     $badmsg, %esi
        call    puts
        mov     $3, %al
        mov     $EXIT_PORT, %dx
        out     %al, %dx
        jmp     1b

puts:
        lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     puts
2:      ret

banner: .asciz  "pvh guest: cmdline="
badmsg: .asciz  "pvh guest: bad start_info magic\n"
