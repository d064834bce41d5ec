#define _GNU_SOURCE
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <unistd.h>

void ksm_say(const char *text)
{
    char line[640];
    int len = snprintf(line, sizeof line, "ksmpreload: %s\n", text);
    if (len <= 0)
        return;
    if ((size_t)len >= sizeof line) { /* cut short, still one line */
        len = sizeof line - 1;
        line[len - 1] = '\n';
    }
    (void)!write(STDERR_FILENO, line, (size_t)len);
}

void ksm_escape(char *out, size_t size, const char *text, size_t most)
{
    size_t used = 0;
    for (size_t i = 0; i < most && text[i]; i++) {
        unsigned char c = (unsigned char)text[i];
        int plain = c >= 0x20 && c < 0x7f && c != '\\';
        if (used + (plain ? 1 : 4) >= size)
            break;
        if (plain)
            out[used++] = (char)c;
        else
            used += (size_t)snprintf(out + used, size - used, "\\x%02x", c);
    }
    out[used] = '\0';
}

static void warn_invalid(const char *name, const char *value, const char *expected, const char *used)
{
    char shown[4 * 64 + 1], text[512];
    ksm_escape(shown, sizeof shown, value, 64);
    snprintf(text, sizeof text, "%s='%s' is not %s; using %s", name, shown, expected, used);
    ksm_say(text);
}

/* "65536", "64K", "2M", "1G", "1T" (powers of 1024). Returns 0 when not a size. */
static size_t parse_size(const char *text)
{
    char *end;
    if (!*text || *text == '-')
        return 0;
    unsigned long long value = strtoull(text, &end, 10);
    unsigned shift = 0;
    switch (*end) {
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    case 't':
    case 'T':
        shift = 40;
        end++;
        break;
    }
    if (*end == 'i' || *end == 'B' || *end == 'b')
        end += (*end == 'i' && end[1] == 'B') ? 2 : 1;
    if (end == text || *end || value > (SIZE_MAX >> shift))
        return 0;
    return (size_t)value << shift;
}

static void read_threshold(struct ksm_config *config, size_t page_size)
{
    const char *text = secure_getenv("KSMPRELOAD_THRESHOLD");
    if (!text)
        return;
    size_t value = parse_size(text);
    if (value >= page_size && value <= ((size_t)1 << 40)) {
        config->threshold = value;
        return;
    }
    char used[64], expected[96];
    snprintf(used, sizeof used, "%zu", config->threshold);
    snprintf(expected, sizeof expected, "a size from %zu bytes to 1T (like 64K or 2M)", page_size);
    warn_invalid("KSMPRELOAD_THRESHOLD", text, expected, used);
}

static void read_strategy(struct ksm_config *config)
{
    static const char *const names[] = {"auto", "prctl", "madvise", "observe"};
    const char *text = secure_getenv("KSMPRELOAD_STRATEGY");
    if (!text)
        return;
    for (int i = 0; i < 4; i++)
        if (strcmp(text, names[i]) == 0) {
            config->strategy = (enum ksm_strategy)i;
            return;
        }
    warn_invalid("KSMPRELOAD_STRATEGY", text, "auto, prctl, madvise or observe", "auto");
}

static void read_flag(const char *name, int *flag)
{
    const char *text = secure_getenv(name);
    if (!text)
        return;
    if (strcmp(text, "0") == 0 || strcmp(text, "1") == 0)
        *flag = text[0] == '1';
    else
        warn_invalid(name, text, "0 or 1", *flag ? "1" : "0");
}

void ksm_config_read(struct ksm_config *config, size_t page_size)
{
    config->threshold = KSM_DEFAULT_THRESHOLD;
    config->strategy = KSM_STRATEGY_AUTO;
    config->align = 1;
    config->cache = 0; /* opt-in: docs/COUNTERS.md says what it may still do wrong */
    config->verbose = 0;
    config->jemalloc_hooks = 0;
    /* secure_getenv gives nothing in AT_SECURE programs, whose environment an unprivileged
     * user set; they publish no file at all: no file made or removed in a root directory. */
    config->stats_dir = getauxval(AT_SECURE) ? "off" : secure_getenv("KSMPRELOAD_STATS_DIR");
    read_threshold(config, page_size);
    read_strategy(config);
    read_flag("KSMPRELOAD_ALIGN", &config->align);
    read_flag("KSMPRELOAD_CACHE", &config->cache);
    read_flag("KSMPRELOAD_VERBOSE", &config->verbose);
    read_flag("KSMPRELOAD_JEMALLOC_HOOKS", &config->jemalloc_hooks);
    if (config->strategy == KSM_STRATEGY_OBSERVE) {
        config->threshold = SIZE_MAX; /* every allocation and mapping passes straight through */
        config->align = 0;
        config->cache = 0;
        config->jemalloc_hooks = 0;
    }
}

/* glibc stops moving its mmap threshold once any of these is set (malloc.c, do_set_*). */
int ksm_glibc_thresholds_fixed(void)
{
    static const char *const variables[] = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                                            "MALLOC_MMAP_MAX_"};
    static const char *const tunables[] = {"glibc.malloc.mmap_threshold=", "glibc.malloc.trim_threshold=",
                                           "glibc.malloc.top_pad=", "glibc.malloc.mmap_max="};
    const char *set = secure_getenv("GLIBC_TUNABLES");
    for (int i = 0; i < 4; i++)
        if (secure_getenv(variables[i]) || (set && strstr(set, tunables[i])))
            return 1;
    return 0;
}
