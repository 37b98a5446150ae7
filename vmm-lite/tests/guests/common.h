/* Shared constants for the tiny test guests (preprocessed by gcc before as). */
#define COM1            0x3f8
#define BOOT_TIMER      0xd0000000
#define BOOT_TIMER_MAGIC 123
#define I8042_CMD       0x64
#define I8042_RESET     0xfe
#define EXIT_PORT       0x501
#define BP_CMD_LINE_PTR 0x228   /* boot_params.hdr.cmd_line_ptr */
#define PVH_CMDLINE     0x18    /* hvm_start_info.cmdline_paddr */
