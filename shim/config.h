/* Configuration read from the environment once, in the constructor. */
#ifndef KSMPRELOAD_CONFIG_H
#define KSMPRELOAD_CONFIG_H

#include <stddef.h>

/* observe: mark and align nothing, only count (the program's own madvise calls): how the
 * program behaves without the shim, seen from inside (ksmpreload doctor --as-is). */
enum ksm_strategy { KSM_STRATEGY_AUTO, KSM_STRATEGY_PRCTL, KSM_STRATEGY_MADVISE, KSM_STRATEGY_OBSERVE };

/* Allocations and mappings of at least this size are handled; smaller ones pass straight through.
 * 8 KiB: the best net saving but for 4 KiB, at half its memory cost (docs/BENCHMARKS.md). */
#define KSM_DEFAULT_THRESHOLD ((size_t)8 * 1024)

struct ksm_config {
    size_t threshold;
    enum ksm_strategy strategy;
    int align;
    int cache; /* keep freed aligned blocks for reuse (block_cache.c); KSMPRELOAD_CACHE=1 */
    int verbose;
    int jemalloc_hooks; /* measurement mode: count jemalloc's extents through its hooks */
    const char *stats_dir;
};

/* Reads KSMPRELOAD_* variables; an invalid value gives one line on stderr and the default.
 * In a setuid, setgid or file-capability program (AT_SECURE) none is read, and stats_dir
 * is "off". */
void ksm_config_read(struct ksm_config *config, size_t page_size);
/* The program fixed glibc's malloc thresholds (MALLOC_MMAP_THRESHOLD_ and its kin, or their
 * GLIBC_TUNABLES): glibc then never moves its mmap threshold. */
int ksm_glibc_thresholds_fixed(void);
/* One line on stderr, "ksmpreload: <text>", without stdio. */
void ksm_say(const char *text);
/* The first `most` bytes of text, printable: control characters, backslashes and non-ASCII
 * bytes as \xNN. out needs 4 * most + 1 bytes to hold them all. */
void ksm_escape(char *out, size_t size, const char *text, size_t most);

#endif
