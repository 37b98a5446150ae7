/*
 * PID 1 for vmm-lite's real-Linux tests (tests/linux_boot.rs), built with `gcc -static`.
 *
 * Runs under the project's guest kernel, booted by vmm-lite under real (nested) KVM. What it
 * does is chosen by kernel command-line parameters, which Linux hands to init as
 * environment variables:
 *   linit_boot_timer=1  first thing, write 123 to vmm-lite's boot-timer page (0xd0000000)
 *                       through /dev/mem, as the probe does;
 *   linit_mode=vsock    connect to the host (CID 2, port 5200), send a line, print the
 *                       reply; then listen on port 6000, echo one line back to the host;
 *   linit_mode=info     print the online CPU count and CPUID-derived /proc/cpuinfo flags;
 *   linit_mode=wait     print "linit: waiting" and sleep until the VMM is stopped.
 * Every mode but wait ends with reboot(), which vmm-lite turns into its exit (status 0).
 * Lines start with "linit: " so the test can find them in the serial output.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BOOT_TIMER_ADDR 0xd0000000UL

static void say(const char *msg) {
    (void)!write(1, msg, strlen(msg));
}

static void boot_timer(void) {
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) {
        say("linit: boot-timer: cannot open /dev/mem\n");
        return;
    }
    volatile uint8_t *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, BOOT_TIMER_ADDR);
    if (p == MAP_FAILED) {
        say("linit: boot-timer: mmap failed\n");
    } else {
        *p = 123;
        munmap((void *)p, 4096);
        say("linit: boot-timer written\n");
    }
    close(fd);
}

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0)
            break;
        if (buf[n++] == '\n')
            break;
    }
    buf[n] = 0;
    return (int)n;
}

static void vsock(void) {
    char buf[256], out[320];
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = 5200};
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        say("linit: vsock connect to 2:5200 failed\n");
        return;
    }
    const char *ping = "ping from guest\n";
    (void)!write(s, ping, strlen(ping));
    read_line(s, buf, sizeof buf);
    snprintf(out, sizeof out, "linit: host replied: %s", buf);
    say(out);
    close(s);

    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm la = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = 6000};
    if (l < 0 || bind(l, (struct sockaddr *)&la, sizeof la) != 0 || listen(l, 1) != 0) {
        say("linit: vsock listen on 6000 failed\n");
        return;
    }
    say("linit: listening on 6000\n");
    int c = accept(l, NULL, NULL);
    if (c < 0) {
        say("linit: accept failed\n");
        return;
    }
    read_line(c, buf, sizeof buf);
    snprintf(out, sizeof out, "echo: %s", buf);
    (void)!write(c, out, strlen(out));
    say("linit: echoed to host\n");
    close(c);
}

static void info(void) {
    char out[512];
    cpu_set_t set;
    CPU_ZERO(&set);
    sched_getaffinity(0, sizeof set, &set);
    snprintf(out, sizeof out, "linit: cpus=%d\n", CPU_COUNT(&set));
    say(out);
    if (mount("proc", "/proc", "proc", 0, NULL) != 0) {
        say("linit: cannot mount /proc\n");
        return;
    }
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[4096];
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) == 0) {
            snprintf(out, sizeof out, "linit: hypervisor=%d tsc_deadline_timer=%d x2apic=%d\n",
                     strstr(line, " hypervisor") != NULL, strstr(line, " tsc_deadline_timer") != NULL,
                     strstr(line, " x2apic") != NULL);
            say(out);
            break;
        }
    }
    if (f)
        fclose(f);
}

int main(void) {
    if (getenv("linit_boot_timer"))
        boot_timer();
    say("linit: init started\n");
    const char *mode = getenv("linit_mode");
    if (!mode)
        mode = "vsock";
    if (strcmp(mode, "vsock") == 0) {
        vsock();
    } else if (strcmp(mode, "info") == 0) {
        info();
    } else if (strcmp(mode, "wait") == 0) {
        say("linit: waiting\n");
        for (;;)
            pause();
    }
    say("linit: done\n");
    sync();
    reboot(RB_AUTOBOOT);
    return 0;
}
