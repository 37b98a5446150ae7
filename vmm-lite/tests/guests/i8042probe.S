/*
 * Tiny 64-bit guest that probes the i8042 the way Linux does, then resets through it:
 *   1. i8042_flush() (drivers/input/serio/i8042.c): while the status port (0x64) shows
 *      OBF (bit 0), read the data port (0x60); after 16 reads (I8042_BUFFER_SIZE) with OBF
 *      still set, Linux gives up: "No controller found".
 *   2. kb_wait() of the reboot path (arch/x86/kernel/reboot.c): poll the status port until
 *      IBF (bit 1) is clear (Linux polls up to 0x10000 times; 1000 here).
 *   3. Reset: write 0xfe to the command port (VMM exits 0, reason i8042-reset).
 * Wrong decisions exit through the debug exit port instead:
 *   10+N  the flush ended after N data reads: Linux would believe a controller is there
 *   50    IBF never cleared: the reboot would wait 131 ms
 *   60    the reset command did not stop the VM
 */
#include "common.h"
#define I8042_DATA      0x60
#define STR_OBF         0x01
#define STR_IBF         0x02
        .code64
        .text
        .globl _start
_start:
        movl    $BOOT_TIMER, %edi
        movb    $BOOT_TIMER_MAGIC, (%rdi)
        xor     %ecx, %ecx              /* data reads so far */
1:      in      $I8042_CMD, %al
        test    $STR_OBF, %al
        jz      present
        cmp     $16, %ecx
        jae     absent
        in      $I8042_DATA, %al
        inc     %ecx
        jmp     1b
present:
        lea     10(%rcx), %eax
        jmp     done
absent:
        mov     $1000, %ecx
2:      in      $I8042_CMD, %al
        test    $STR_IBF, %al
        jz      reset
        dec     %ecx
        jnz     2b
        mov     $50, %al
        jmp     done
reset:
        mov     $I8042_RESET, %al
        out     %al, $I8042_CMD
        mov     $60, %al
done:   mov     $EXIT_PORT, %dx
        out     %al, %dx
3:      hlt
        jmp     3b
