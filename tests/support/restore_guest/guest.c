/* A tiny freestanding guest for Firecracker tests (see testkit::firecracker).
 *
 * It writes a pattern into 8 MiB of memory, prints "ready" on COM1 (Firecracker's stdout),
 * then loops forever: each pass writes PER_PASS pages it never touched before (so a restored
 * VM keeps faulting new pages), checks a few words of the pattern, and prints "pass N" (or
 * "pass BAD N" if anything read back wrong). Runs at CPL0 in 64-bit mode with the first GiB
 * identity-mapped, as Firecracker enters an ELF kernel; general registers only.
 */
#define COM1 0x3f8
static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static void put(const char *s) { while (*s) outb(COM1, (unsigned char)*s++); }
static void putnum(unsigned long n) {
    char b[24]; int i = 0;
    do { b[i++] = (char)('0' + n % 10); n /= 10; } while (n);
    while (i) outb(COM1, (unsigned char)b[--i]);
}
#define FILLED ((volatile unsigned long *)0x1000000)
#define FILLED_WORDS ((8UL << 20) / 8)
#define FRESH_BASE 0x2000000UL
#define FRESH_PAGES (((96UL << 20)) / 4096)
#define PER_PASS 8
void guest_main(void) {
    for (unsigned long i = 0; i < FILLED_WORDS; i += 512) FILLED[i] = i * 7 + 1;
    put("ready\n");
    unsigned long pass = 0, fresh = 0;
    for (;;) {
        int bad = 0;
        for (int p = 0; p < PER_PASS; p++) {
            volatile unsigned long *q = (volatile unsigned long *)(FRESH_BASE + (fresh % FRESH_PAGES) * 4096);
            if (*q != 0 && *q != fresh + 1) bad = 1;
            *q = fresh + 1;
            fresh++;
        }
        for (unsigned long i = (pass * 512 * 3) % FILLED_WORDS, n = 0; n < 8; n++, i = (i + 512 * 97) % FILLED_WORDS)
            if (FILLED[i] != i * 7 + 1) bad = 1;
        put(bad ? "pass BAD " : "pass ");
        putnum(pass++);
        put("\n");
        for (volatile unsigned long d = 0; d < DELAY; d++) {}
    }
}
__asm__(".globl _start\n_start:\n mov $0x90000, %rsp\n call guest_main\n1: hlt\n jmp 1b\n");
