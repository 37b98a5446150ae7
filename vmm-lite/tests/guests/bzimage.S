/*
 * Tiny bzImage built to the Linux boot protocol (2.15 header, 64-bit entry). The setup
 * area is one sector plus the boot sector; the protected-mode part loads at 1 MiB and the
 * 64-bit entry is 0x200 bytes into it (like startup_64). Writes the boot-timer marker,
 * prints a banner and the command line from boot_params and resets through the i8042.
 * Linked flat (base 0) by bzimage.ld.
 */
#include "common.h"
#define SETUP_SECTS 1
        .code16
        .section .text
        .globl _start
_start:
        .org    0x1f1
        .byte   SETUP_SECTS             /* setup_sects */
        .word   0                       /* root_flags */
        .long   (payload_end - payload) / 16  /* syssize */
        .word   0                       /* ram_size */
        .word   0                       /* vid_mode */
        .word   0                       /* root_dev */
        .word   0xaa55                  /* boot_flag */
        .byte   0xeb, 0x66              /* jump */
        .ascii  "HdrS"                  /* header */
        .word   0x020f                  /* version */
        .long   0                       /* realmode_swtch */
        .word   0                       /* start_sys_seg */
        .word   0                       /* kernel_version: none, not a Linux kernel */
        .byte   0                       /* type_of_loader */
        .byte   1                       /* loadflags: LOADED_HIGH */
        .word   0                       /* setup_move_size */
        .long   0x100000                /* code32_start */
        .long   0                       /* ramdisk_image */
        .long   0                       /* ramdisk_size */
        .long   0                       /* bootsect_kludge */
        .word   0                       /* heap_end_ptr */
        .byte   0                       /* ext_loader_ver */
        .byte   0                       /* ext_loader_type */
        .long   0                       /* cmd_line_ptr */
        .long   0x37ffffff              /* initrd_addr_max */
        .long   0x200000                /* kernel_alignment */
        .byte   0                       /* relocatable_kernel */
        .byte   0                       /* min_alignment */
        .word   1                       /* xloadflags: XLF_KERNEL_64 */
        .long   2047                    /* cmdline_size */
        .org    0x260
        .long   0x10000                 /* init_size */
        .org    (SETUP_SECTS + 1) * 512

payload:
        /* 32-bit entry (unused by 64-bit loaders): halt. */
        .fill   0x200, 1, 0xf4
        .code64
startup_64:
        movl    $BOOT_TIMER, %edi
        movb    $BOOT_TIMER_MAGIC, (%rdi)
        mov     %rsi, %rbx
        mov     $COM1, %dx
        lea     banner(%rip), %rsi
        call    puts
        mov     BP_CMD_LINE_PTR(%rbx), %esi
        call    puts
        mov     $'\n', %al
        out     %al, %dx
        mov     $I8042_RESET, %al
        out     %al, $I8042_CMD
1:      hlt
        jmp     1b
puts:
        lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     puts
2:      ret
banner: .asciz  "bzimage guest: cmdline="
        .align  16
payload_end:
