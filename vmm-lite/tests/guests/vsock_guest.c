/*
 * Tiny guest with a minimal virtio-mmio vsock driver (polling, no interrupts).
 *
 * 1. Probes the device at 0xd0001000 and negotiates VIRTIO_F_VERSION_1.
 * 2. Guest-initiated: connects to CID 2 port 5200, sends "hello from guest\n", echoes
 *    every byte the host sends back, until the host closes (SHUTDOWN) -> RST.
 * 3. Host-initiated: accepts a REQUEST on port 6000, echoes data until SHUTDOWN -> RST.
 * Returns 0 on success (the entry resets through the i8042), else a stage number that
 * becomes the VMM's exit status.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define MMIO 0xd0001000UL
#define QSZ 8
#define RXBUF 300
#define HDR 44
#define GUEST_CID 3
#define PORT_OUT 5200
#define PORT_IN 6000
#define MY_PORT 1234
#define BUF_ALLOC 4096
#define TIMEOUT 4000000UL

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE,
       OP_CREDIT_REQUEST };

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vq {
    struct desc d[QSZ];
    u16 avail_flags, avail_idx, avail_ring[QSZ], used_event;
    u8 pad[4096 - 16 * QSZ - 6 - 2 * QSZ];
    u16 used_flags, used_idx;
    struct { u32 id, len; } used_ring[QSZ];
    u16 avail_event;
} __attribute__((aligned(4096)));

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct vq rxq, txq;
static u8 rxbufs[QSZ][RXBUF];
static u8 txbuf[HDR + 512];
static u16 rx_seen, tx_seen;
static u32 fwd_cnt;

void *memset(void *p, int c, unsigned long n) {
    u8 *b = p;
    while (n--) *b++ = (u8)c;
    return p;
}
void *memcpy(void *d, const void *s, unsigned long n) {
    u8 *a = d; const u8 *b = s;
    while (n--) *a++ = *b++;
    return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static void puts(const char *s) { while (*s) outb(0x3f8, (u8)*s++); }
static void putn(u32 n) {
    char b[12]; int i = 11; b[i] = 0;
    do { b[--i] = '0' + n % 10; n /= 10; } while (n);
    puts(b + i);
}
static inline u32 rd(u32 off) { return *(volatile u32 *)(MMIO + off); }
static inline void wr(u32 off, u32 v) { *(volatile u32 *)(MMIO + off) = v; }
#define barrier() __asm__ volatile("mfence" ::: "memory")

static void setup_queue(u32 idx, struct vq *q) {
    wr(0x30, idx);
    wr(0x38, QSZ);
    wr(0x80, (u32)(u64)&q->d); wr(0x84, 0);
    wr(0x90, (u32)(u64)&q->avail_flags); wr(0x94, 0);
    wr(0xa0, (u32)(u64)&q->used_flags); wr(0xa4, 0);
    wr(0x44, 1);
}

static void post_rx(u16 i) {
    rxq.avail_ring[rxq.avail_idx % QSZ] = i;
    barrier();
    rxq.avail_idx++;
    barrier();
    wr(0x50, 0);
}

static int send(u16 op, u32 src_port, u32 dst_port, const u8 *data, u32 len) {
    struct hdr *h = (struct hdr *)txbuf;
    memset(h, 0, HDR);
    h->src_cid = GUEST_CID; h->dst_cid = 2;
    h->src_port = src_port; h->dst_port = dst_port;
    h->len = len; h->type = 1; h->op = op;
    h->buf_alloc = BUF_ALLOC; h->fwd_cnt = fwd_cnt;
    memcpy(txbuf + HDR, data, len);
    txq.d[0].addr = (u64)txbuf; txq.d[0].len = HDR + len; txq.d[0].flags = 0;
    txq.avail_ring[txq.avail_idx % QSZ] = 0;
    barrier();
    txq.avail_idx++;
    barrier();
    wr(0x50, 1);
    for (u64 t = 0; t < TIMEOUT; t++) {
        barrier();
        if (*(volatile u16 *)&txq.used_idx != tx_seen) { tx_seen++; return 0; }
    }
    return -1;
}

/* Waits for the next RX packet; copies the header out and returns the buffer index. */
static int recv(struct hdr *out) {
    for (u64 t = 0; t < TIMEOUT; t++) {
        barrier();
        if (*(volatile u16 *)&rxq.used_idx != rx_seen) {
            u32 id = rxq.used_ring[rx_seen % QSZ].id;
            rx_seen++;
            if (id >= QSZ) return -1;
            memcpy(out, rxbufs[id], HDR);
            return (int)id;
        }
    }
    return -1;
}

/* Echo loop on one connection until the host shuts it down. */
static int echo(u32 local, u32 peer) {
    struct hdr h;
    for (;;) {
        int id = recv(&h);
        if (id < 0) return -1;
        u8 data[256];
        u32 n = h.len > 256 ? 256 : h.len;
        memcpy(data, rxbufs[id] + HDR, n);
        post_rx((u16)id);
        if (h.dst_port != local || h.src_port != peer) continue;
        if (h.op == OP_RW) {
            fwd_cnt += h.len;
            if (send(OP_RW, local, peer, data, n)) return -1;
        } else if (h.op == OP_SHUTDOWN || h.op == OP_RST) {
            if (h.op == OP_SHUTDOWN) send(OP_RST, local, peer, 0, 0);
            return 0;
        } else if (h.op == OP_CREDIT_REQUEST) {
            send(OP_CREDIT_UPDATE, local, peer, 0, 0);
        }
    }
}

int guest_main(void *boot_params) {
    (void)boot_params;
    puts("vsock guest: start\n");
    if (rd(0) != 0x74726976 || rd(4) != 2 || rd(8) != 19) { puts("no vsock device\n"); return 10; }
    wr(0x70, 0);
    wr(0x70, 1);
    wr(0x70, 3);
    wr(0x24, 1); wr(0x20, 1);
    wr(0x24, 0); wr(0x20, 0);
    wr(0x70, 11);
    if (!(rd(0x70) & 8)) { puts("features refused\n"); return 11; }
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    wr(0x70, 15);
    if (rd(0x70) & 0x40) { puts("device needs reset\n"); return 12; }
    u32 cid = rd(0x100);
    puts("vsock guest: cid="); putn(cid); puts("\n");
    for (u16 i = 0; i < QSZ; i++) {
        rxq.d[i].addr = (u64)rxbufs[i]; rxq.d[i].len = RXBUF; rxq.d[i].flags = 2;
        post_rx(i);
    }

    /* Guest-initiated connection. */
    struct hdr h;
    fwd_cnt = 0;
    if (send(OP_REQUEST, MY_PORT, PORT_OUT, 0, 0)) return 13;
    int id = recv(&h);
    if (id < 0) return 14;
    post_rx((u16)id);
    if (h.op != OP_RESPONSE) { puts("connect refused\n"); return 15; }
    puts("vsock guest: connected to host port 5200\n");
    static const char hello[] = "hello from guest\n";
    if (send(OP_RW, MY_PORT, PORT_OUT, (const u8 *)hello, sizeof(hello) - 1)) return 16;
    if (echo(MY_PORT, PORT_OUT)) return 17;
    puts("vsock guest: outbound connection closed\n");

    /* Host-initiated connection on port 6000. */
    fwd_cnt = 0;
    for (;;) {
        id = recv(&h);
        if (id < 0) return 18;
        post_rx((u16)id);
        if (h.op == OP_REQUEST && h.dst_port == PORT_IN) break;
    }
    u32 peer = h.src_port;
    if (send(OP_RESPONSE, PORT_IN, peer, 0, 0)) return 19;
    puts("vsock guest: accepted host connection from port "); putn(peer); puts("\n");
    if (echo(PORT_IN, peer)) return 20;
    puts("vsock guest: done\n");
    return 0;
}
