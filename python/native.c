/* Helpers compiled into ksmpreload._native. Each returns 0 (or a value) on
 * success and -errno on failure, so Python can raise OSError with the code. */
#include <errno.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

static int ksm_prctl_set_merge(int enable) { return prctl(PR_SET_MEMORY_MERGE, enable, 0, 0, 0) == 0 ? 0 : -errno; }

static int ksm_prctl_get_merge(void)
{
    int merge = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
    return merge >= 0 ? merge : -errno;
}

static int ksm_madvise_mergeable(void *addr, size_t length)
{
    return madvise(addr, length, MADV_MERGEABLE) == 0 ? 0 : -errno;
}

static long ksm_page_size(void) { return sysconf(_SC_PAGESIZE); }

/* ---- page frames: which KSM pages which processes map (ksmpreload/sharing.py) ----------------
 *
 * Everything below takes arrays and runs with no Python per page. The bit layouts of pagemap
 * entries and of /proc/kpageflags are kernel facts kept in ksmpreload/kernel.py and passed in
 * as masks; only the PAGEMAP_SCAN ioctl's ABI is spelled out here (older headers lack it). */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

struct ksm_page_region { /* struct page_region, include/uapi/linux/fs.h (Linux 6.7+) */
    uint64_t start, end, categories;
};

struct ksm_pm_scan_arg { /* struct pm_scan_arg */
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

#define KSM_PAGEMAP_SCAN _IOWR('f', 16, struct ksm_pm_scan_arg)
#define KSM_PAGE_IS_FILE (1 << 2)
#define KSM_PAGE_IS_PRESENT (1 << 3)
#define KSM_SCAN_RANGES 256

/* pread until `bytes` are read or end of file; bytes read, or -errno. */
static long ksm_pread_full(int fd, void *buf, size_t bytes, uint64_t offset)
{
    size_t done = 0;
    while (done < bytes) {
        ssize_t got = pread(fd, (char *)buf + done, bytes - done, (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            break;
        done += (size_t)got;
    }
    return (long)done;
}

/* Pagemap entries of pages [first, end) that satisfy (entry & keep_mask) == keep_value, as
 * PFNs (entry & pfn_mask), appended to out in address order, and their page indices to pages
 * unless it is NULL. Reads buf_words entries per pread. Stops before out could overflow:
 * *next is the first page not looked at, so the caller grows out and calls again.
 * counts[0] += entries kept, counts[1] += kept entries whose PFN reads as 0 (what an
 * unprivileged reader gets). Returns the PFNs appended or -errno. */
static long ksm_pagemap_read(int fd, uint64_t first, uint64_t end, uint64_t *buf, size_t buf_words, uint64_t keep_mask,
                             uint64_t keep_value, uint64_t pfn_mask, uint64_t *out, uint64_t *pages, size_t out_cap,
                             uint64_t *next, uint64_t *counts)
{
    size_t kept = 0;
    uint64_t page = first;
    while (page < end) {
        size_t want = buf_words;
        if (want > end - page)
            want = (size_t)(end - page);
        if (want > out_cap - kept)
            want = out_cap - kept;
        if (want == 0)
            break;
        long got = ksm_pread_full(fd, buf, want * sizeof *buf, page * sizeof *buf);
        if (got < 0)
            return got;
        size_t words = (size_t)got / sizeof *buf;
        for (size_t i = 0; i < words; i++) {
            uint64_t entry = buf[i];
            if ((entry & keep_mask) == keep_value) {
                uint64_t pfn = entry & pfn_mask;
                if (pages)
                    pages[kept] = page + i;
                out[kept++] = pfn;
                counts[1] += pfn == 0;
            }
        }
        if (words < want) { /* end of the address space the file shows */
            page = end;
            break;
        }
        page += words;
    }
    counts[0] += kept;
    *next = page;
    return (long)kept;
}

/* Like ksm_pagemap_read, but asks the kernel first (ioctl PAGEMAP_SCAN, Linux 6.7+) which
 * pages are present and not file-backed, and reads pagemap only there: a large reservation
 * with few pages in it costs its page tables, not 8 bytes per virtual page. Pages are indices
 * (address / page_size). Returns -ENOTTY or -EINVAL where the kernel lacks the ioctl. */
static long ksm_pagemap_read_present(int fd, uint64_t first, uint64_t end, long page_size, uint64_t *buf,
                                     size_t buf_words, uint64_t keep_mask, uint64_t keep_value, uint64_t pfn_mask,
                                     uint64_t *out, uint64_t *pages, size_t out_cap, uint64_t *next, uint64_t *counts)
{
    struct ksm_page_region ranges[KSM_SCAN_RANGES];
    size_t kept = 0;
    uint64_t page = first;
    while (page < end) {
        struct ksm_pm_scan_arg arg = {
            .size = sizeof arg,
            .start = page * (uint64_t)page_size,
            .end = end * (uint64_t)page_size,
            .vec = (uint64_t)(uintptr_t)ranges,
            .vec_len = KSM_SCAN_RANGES,
            .category_inverted = KSM_PAGE_IS_FILE,
            .category_mask = KSM_PAGE_IS_PRESENT | KSM_PAGE_IS_FILE,
            .return_mask = KSM_PAGE_IS_PRESENT,
        };
        int found = ioctl(fd, KSM_PAGEMAP_SCAN, &arg);
        if (found < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        uint64_t walked = arg.walk_end / (uint64_t)page_size;
        for (int r = 0; r < found; r++) {
            uint64_t from = ranges[r].start / (uint64_t)page_size, to = ranges[r].end / (uint64_t)page_size;
            if (from < page)
                from = page;
            uint64_t stop = from;
            long got = ksm_pagemap_read(fd, from, to, buf, buf_words, keep_mask, keep_value, pfn_mask, out + kept,
                                        pages ? pages + kept : NULL, out_cap - kept, &stop, counts);
            if (got < 0)
                return got;
            kept += (size_t)got;
            if (stop < to) { /* out is full */
                *next = stop;
                return (long)kept;
            }
            page = to;
        }
        if (walked <= page && found == 0)
            walked = end; /* nothing more, whatever walk_end says */
        page = walked > page ? walked : page;
    }
    *next = page;
    return (long)kept;
}

/* Sorts keys (value << 32 | position) by their top `bits` bits (32 at most) with a stable
 * LSD radix sort, in as few passes of at most 12 bits as that needs. tmp has n words.
 * Returns 0 or -ENOMEM. */
static int ksm_radix_sort_high(uint64_t *keys, size_t n, uint64_t *tmp, int bits)
{
    enum { MAX_DIGIT = 12 };
    int passes = (bits + MAX_DIGIT - 1) / MAX_DIGIT;
    if (passes == 0)
        return 0;
    int digit = (bits + passes - 1) / passes;
    size_t buckets = (size_t)1 << digit, mask = buckets - 1;
    size_t *count = malloc(buckets * sizeof *count);
    if (!count)
        return -ENOMEM;
    uint64_t *from = keys, *to = tmp;
    for (int shift = 32; shift < 32 + bits; shift += digit) {
        memset(count, 0, buckets * sizeof *count);
        for (size_t i = 0; i < n; i++)
            count[(from[i] >> shift) & mask]++;
        size_t sum = 0;
        for (size_t b = 0; b < buckets; b++) {
            size_t c = count[b];
            count[b] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; i++)
            to[count[(from[i] >> shift) & mask]++] = from[i];
        uint64_t *swap = from;
        from = to;
        to = swap;
    }
    free(count);
    if (from != keys)
        memcpy(keys, from, n * sizeof *keys);
    return 0;
}

/* Sorts PFNs by value with their positions: keys[i] = pfn << 32 | position, ascending by
 * PFN and, for one PFN, by position (ksm_radix_sort_high on the PFN bits only: two passes up
 * to 64 GiB of RAM). tmp has n words. Returns 0, or -ERANGE if a PFN or n does not fit in
 * 32 bits (16 TiB). */
static int ksm_sort_pfns(const uint64_t *pfns, size_t n, uint64_t *keys, uint64_t *tmp)
{
    if ((uint64_t)n > UINT32_MAX)
        return -ERANGE;
    uint64_t all = 0;
    for (size_t i = 0; i < n; i++) {
        all |= pfns[i];
        keys[i] = pfns[i] << 32 | (uint64_t)i;
    }
    if (all > UINT32_MAX)
        return -ERANGE;
    int bits = 0;
    while (bits < 32 && (all >> bits) != 0)
        bits++;
    return ksm_radix_sort_high(keys, n, tmp, bits);
}

/* The distinct PFNs of sorted keys (ksm_sort_pfns), ascending, into out; returns how many. */
static size_t ksm_distinct_pfns(const uint64_t *keys, size_t n, uint64_t *out)
{
    size_t distinct = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t pfn = keys[i] >> 32;
        if (distinct == 0 || out[distinct - 1] != pfn)
            out[distinct++] = pfn;
    }
    return distinct;
}

/* out[i] = the 64-bit word of pfns[i] in a file indexed by PFN (/proc/kpageflags,
 * /proc/kpagecount); pfns ascending and distinct. PFNs at most max_gap apart are read with
 * one pread (a syscall costs more than reading a few words it does not need), spans of at
 * most buf_words words. A PFN past the end of the file reads as 0. Returns 0 or -errno. */
static int ksm_read_pfn_words(int fd, const uint64_t *pfns, size_t n, uint64_t max_gap, uint64_t *buf, size_t buf_words,
                              uint64_t *out)
{
    size_t i = 0;
    while (i < n) {
        uint64_t start = pfns[i];
        size_t j = i + 1;
        while (j < n && pfns[j] - pfns[j - 1] <= max_gap + 1 && pfns[j] - start < buf_words)
            j++;
        size_t span = (size_t)(pfns[j - 1] - start + 1);
        long got = ksm_pread_full(fd, buf, span * sizeof *buf, start * sizeof *buf);
        if (got < 0)
            return (int)got;
        size_t words = (size_t)got / sizeof *buf;
        for (size_t k = i; k < j; k++) {
            size_t at = (size_t)(pfns[k] - start);
            out[k] = at < words ? buf[at] : 0;
        }
        i = j;
    }
    return 0;
}

/* The pfns whose word has any bit of mask set, into out (order kept); returns how many. */
static size_t ksm_select_pfns(const uint64_t *pfns, const uint64_t *words, size_t n, uint64_t mask, uint64_t *out)
{
    size_t selected = 0;
    for (size_t i = 0; i < n; i++)
        if (words[i] & mask)
            out[selected++] = pfns[i];
    return selected;
}

/* Per-process fields of ksm_attribute's per_proc (KSM_PROC_FIELDS per process). */
enum {
    KSM_P_MAPPED,             /* pages of the process that map a KSM page (ksm_merging_pages) */
    KSM_P_DISTINCT,           /* distinct KSM pages it maps */
    KSM_P_SHARED_IN_SET,      /* ... of which another process of the set maps too */
    KSM_P_WITHIN_ONLY,        /* ... mapped more than once here and by no other process of the set */
    KSM_P_WITHIN_ONLY_MAPPED, /* its pages mapping those */
    KSM_P_OUTSIDE,            /* distinct KSM pages also mapped by processes outside the set */
    KSM_P_LONE,               /* distinct KSM pages mapped once in all (nothing shares them now) */
    KSM_P_FAIR_SAVED,         /* its fair share of the saving, in 1/KSM_FAIR_UNIT pages (below) */
    KSM_PROC_FIELDS
};

/* Totals of ksm_attribute (KSM_TOTAL_FIELDS). */
enum {
    KSM_T_DISTINCT,    /* distinct KSM pages the set maps */
    KSM_T_MAPPED,      /* pages of the set that map them */
    KSM_T_SHARED,      /* distinct KSM pages mapped by two processes of the set or more */
    KSM_T_WITHIN_ONLY, /* distinct KSM pages shared inside one process only */
    KSM_T_OUTSIDE,     /* distinct KSM pages also mapped outside the set */
    KSM_T_LONE,        /* distinct KSM pages mapped once in all */
    KSM_T_FAIR_SAVED,  /* the set's fair shares, in 1/KSM_FAIR_UNIT pages */
    KSM_TOTAL_FIELDS
};

/* A KSM page mapped c times saves c - 1 pages; each mapping is credited (c - 1) / c of a page,
 * so that the shares of every process add up to the machine's saving. Kept in fixed point. */
#define KSM_FAIR_UNIT (1ULL << 20)

/* Per page of the set (position in the PFN array), the kind of KSM page it maps. */
enum { KSM_E_KSM = 1, KSM_E_SHARED = 2, KSM_E_WITHIN = 4 };

static size_t ksm_proc_of(const uint64_t *offsets, size_t nprocs, uint64_t position)
{
    size_t low = 0, high = nprocs; /* offsets[low] <= position < offsets[high] */
    while (high - low > 1) {
        size_t mid = (low + high) / 2;
        if (offsets[mid] <= position)
            low = mid;
        else
            high = mid;
    }
    return low;
}

/* Who maps which KSM page. keys: ksm_sort_pfns of the set's PFNs, process p owning positions
 * [offsets[p], offsets[p+1]). ksm_pfns (ascending) are the KSM pages among them, mapcounts
 * their /proc/kpagecount. Fills entry_kind[position] (KSM_E_*), per_proc (nprocs *
 * KSM_PROC_FIELDS), pairs[a * nprocs + b] for a < b (distinct KSM pages both map) and
 * totals (KSM_TOTAL_FIELDS); all zeroed by the caller. Returns 0 or -ENOMEM. */
static int ksm_attribute(const uint64_t *keys, size_t n, const uint64_t *offsets, size_t nprocs,
                         const uint64_t *ksm_pfns, const uint64_t *mapcounts, size_t nksm, uint8_t *entry_kind,
                         uint64_t *per_proc, uint64_t *pairs, uint64_t *totals)
{
    size_t *procs = malloc((nprocs + 1) * sizeof *procs);
    uint64_t *times = malloc((nprocs + 1) * sizeof *times);
    if (!procs || !times) {
        free(procs);
        free(times);
        return -ENOMEM;
    }
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint64_t pfn = keys[i] >> 32;
        size_t j = i + 1;
        while (j < n && keys[j] >> 32 == pfn)
            j++;
        while (k < nksm && ksm_pfns[k] < pfn)
            k++;
        if (k == nksm || ksm_pfns[k] != pfn) {
            i = j;
            continue;
        }
        /* Positions ascend within a PFN, so its processes come in order. */
        size_t m = 0;
        for (size_t e = i; e < j; e++) {
            size_t p = ksm_proc_of(offsets, nprocs, keys[e] & UINT32_MAX);
            if (m == 0 || procs[m - 1] != p) {
                procs[m] = p;
                times[m++] = 0;
            }
            times[m - 1]++;
        }
        uint64_t mapped = (uint64_t)(j - i);
        uint8_t kind = KSM_E_KSM | (m > 1 ? KSM_E_SHARED : 0) | (m == 1 && mapped > 1 ? KSM_E_WITHIN : 0);
        for (size_t e = i; e < j; e++)
            entry_kind[keys[e] & UINT32_MAX] = kind;
        int outside = mapcounts[k] > mapped, lone = mapcounts[k] <= 1 && mapped == 1;
        /* kpagecount and pagemap are read apart: a count below what the set maps is stale. */
        uint64_t count = mapcounts[k] > mapped ? mapcounts[k] : mapped;
        uint64_t share = (count - 1) * KSM_FAIR_UNIT / count;
        for (size_t a = 0; a < m; a++) {
            uint64_t *row = per_proc + procs[a] * KSM_PROC_FIELDS;
            row[KSM_P_MAPPED] += times[a];
            row[KSM_P_DISTINCT]++;
            row[KSM_P_SHARED_IN_SET] += m > 1;
            row[KSM_P_OUTSIDE] += outside;
            row[KSM_P_LONE] += lone;
            row[KSM_P_FAIR_SAVED] += times[a] * share;
            for (size_t b = a + 1; b < m; b++)
                pairs[procs[a] * nprocs + procs[b]]++;
        }
        if (kind & KSM_E_WITHIN) {
            per_proc[procs[0] * KSM_PROC_FIELDS + KSM_P_WITHIN_ONLY]++;
            per_proc[procs[0] * KSM_PROC_FIELDS + KSM_P_WITHIN_ONLY_MAPPED] += mapped;
        }
        totals[KSM_T_DISTINCT]++;
        totals[KSM_T_MAPPED] += mapped;
        totals[KSM_T_SHARED] += m > 1;
        totals[KSM_T_WITHIN_ONLY] += (kind & KSM_E_WITHIN) != 0;
        totals[KSM_T_OUTSIDE] += outside;
        totals[KSM_T_LONE] += lone;
        totals[KSM_T_FAIR_SAVED] += mapped * share;
        i = j;
    }
    free(procs);
    free(times);
    return 0;
}

/* Per range r of positions [offsets[r], offsets[r+1]): out[3r] its pages mapping KSM pages,
 * out[3r+1] those another process of the set maps too, out[3r+2] those shared within the
 * process only. */
static void ksm_count_kinds(const uint8_t *entry_kind, const uint64_t *offsets, size_t nranges, uint64_t *out)
{
    for (size_t r = 0; r < nranges; r++) {
        uint64_t ksm = 0, shared = 0, within = 0;
        for (uint64_t e = offsets[r]; e < offsets[r + 1]; e++) {
            uint8_t kind = entry_kind[e];
            ksm += kind & KSM_E_KSM;
            shared += (kind & KSM_E_SHARED) != 0;
            within += (kind & KSM_E_WITHIN) != 0;
        }
        out[3 * r] = ksm;
        out[3 * r + 1] = shared;
        out[3 * r + 2] = within;
    }
}

/* ---- page contents: how much of some processes' memory could merge (ksmpreload/potential.py) --
 *
 * Pages are read from /proc/<pid>/mem where pagemap shows them present, hashed (XXH64), the
 * hashes sorted and grouped: pages with equal hashes are taken to hold equal contents. */
#include <time.h>

#define KSM_XXH_P1 0x9E3779B185EBCA87ull
#define KSM_XXH_P2 0xC2B2AE3D27D4EB4Full
#define KSM_XXH_P3 0x165667B19E3779F9ull
#define KSM_XXH_P4 0x85EBCA77C2B2AE63ull
#define KSM_POSITION(key) ((key)&UINT32_MAX)

static inline uint64_t ksm_load64(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, sizeof word);
    return word;
}

static inline uint64_t ksm_rotl(uint64_t x, int bits) { return x << bits | x >> (64 - bits); }

static inline uint64_t ksm_xxh_round(uint64_t acc, uint64_t input)
{
    return ksm_rotl(acc + input * KSM_XXH_P2, 31) * KSM_XXH_P1;
}

static inline uint64_t ksm_xxh_merge(uint64_t acc, uint64_t lane)
{
    return (acc ^ ksm_xxh_round(0, lane)) * KSM_XXH_P1 + KSM_XXH_P4;
}

/* XXH64 (seed 0, little-endian host) of a page of `bytes` bytes, a multiple of 32; 0 if every
 * byte is zero, and 1 for a page whose XXH64 is 0, so that 0 means the zero page only. */
static uint64_t ksm_hash_page(const void *page, size_t bytes)
{
    const unsigned char *p = page;
    uint64_t v1 = KSM_XXH_P1 + KSM_XXH_P2, v2 = KSM_XXH_P2, v3 = 0, v4 = -KSM_XXH_P1, any = 0;
    for (size_t at = 0; at < bytes; at += 32) {
        uint64_t w1 = ksm_load64(p + at), w2 = ksm_load64(p + at + 8);
        uint64_t w3 = ksm_load64(p + at + 16), w4 = ksm_load64(p + at + 24);
        v1 = ksm_xxh_round(v1, w1);
        v2 = ksm_xxh_round(v2, w2);
        v3 = ksm_xxh_round(v3, w3);
        v4 = ksm_xxh_round(v4, w4);
        any |= w1 | w2 | w3 | w4;
    }
    if (!any)
        return 0;
    uint64_t h = ksm_rotl(v1, 1) + ksm_rotl(v2, 7) + ksm_rotl(v3, 12) + ksm_rotl(v4, 18);
    h = ksm_xxh_merge(ksm_xxh_merge(ksm_xxh_merge(ksm_xxh_merge(h, v1), v2), v3), v4);
    h += bytes;
    h = (h ^ h >> 33) * KSM_XXH_P2;
    h = (h ^ h >> 29) * KSM_XXH_P3;
    h ^= h >> 32;
    return h ? h : 1;
}

static double ksm_seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* Reads and hashes pages of a process. pages[0..n) are ascending page indices (address /
 * page_size), pfns[] their PFNs. Each run of consecutive pages is read from mem_fd
 * (/proc/<pid>/mem) with preads of at most buf_pages pages, and each page read is hashed into
 * hashes[] (ksm_hash_page). A page that cannot be read (EIO, EFAULT) is dropped: pages[] and
 * pfns[] are compacted in place, staying aligned with hashes[], and counts[0] += pages
 * dropped. seconds[0] += time reading, seconds[1] += time hashing. Returns the pages kept,
 * or -ESRCH once the process is gone (its memory then reads as empty), or -errno. */
static long ksm_read_hash_pages(int mem_fd, uint64_t *pages, uint64_t *pfns, size_t n, long page_size,
                                unsigned char *buf, size_t buf_pages, uint64_t *hashes, uint64_t *counts,
                                double *seconds)
{
    size_t kept = 0, i = 0, size = (size_t)page_size;
    while (i < n) {
        size_t run = 1;
        while (i + run < n && run < buf_pages && pages[i + run] == pages[i] + run)
            run++;
        double started = ksm_seconds();
        ssize_t got = pread(mem_fd, buf, run * size, (off_t)(pages[i] * size));
        double read = ksm_seconds();
        seconds[0] += read - started;
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && errno != EIO && errno != EFAULT)
            return -errno;
        if (got == 0)
            return -ESRCH;
        size_t whole = got > 0 ? (size_t)got / size : 0;
        for (size_t k = 0; k < whole; k++) {
            hashes[kept] = ksm_hash_page(buf + k * size, size);
            pages[kept] = pages[i + k];
            pfns[kept++] = pfns[i + k];
        }
        seconds[1] += ksm_seconds() - read;
        if (whole < run) { /* the page after those read failed: skip it */
            counts[0]++;
            whole++;
        }
        i += whole;
    }
    return (long)kept;
}

/* keys[i] = the top 32 bits of hashes[i] << 32 | i, sorted by those bits (ksm_radix_sort_high).
 * Returns 0, -ERANGE if n does not fit in 32 bits, or -ENOMEM. */
static int ksm_sort_hashes(const uint64_t *hashes, size_t n, uint64_t *keys, uint64_t *tmp)
{
    if ((uint64_t)n > UINT32_MAX)
        return -ERANGE;
    for (size_t i = 0; i < n; i++)
        keys[i] = (hashes[i] & ~(uint64_t)UINT32_MAX) | (uint64_t)i;
    return ksm_radix_sort_high(keys, n, tmp, 32);
}

/* Kinds of page (bits of ksm_group_contents' and ksm_mark_frames' kinds[]). */
enum {
    KSM_K_ZERO = 1,        /* every byte zero */
    KSM_K_DUP = 2,         /* not zero, and another page of the set holds the same */
    KSM_K_ACROSS = 4,      /* ... and another process of the set holds it */
    KSM_K_WITHIN = 8,      /* ... and only its own process holds it, more than once */
    KSM_K_KSM = 16,        /* maps a KSM page */
    KSM_K_ZERO_FRAME = 32, /* maps the zero page */
    KSM_K_UNMERGED = 64,   /* zero or duplicate, on a frame nothing else maps */
    KSM_KIND_BITS = 7
};

/* Totals of ksm_group_contents (KSM_CONTENT_FIELDS). */
enum {
    KSM_C_CONTENTS,      /* distinct contents, the zero page's included */
    KSM_C_ZERO,          /* zero pages */
    KSM_C_DUP_PAGES,     /* non-zero pages whose content another page of the set holds */
    KSM_C_DUP_CONTENTS,  /* distinct non-zero contents held more than once */
    KSM_C_ACROSS_PAGES,  /* duplicate pages whose content two processes or more hold */
    KSM_C_WITHIN_PAGES,  /* duplicate pages whose content one process holds, several times */
    KSM_C_SAVING_ACROSS, /* per duplicated content, processes holding it - 1 */
    KSM_C_SAVING_WITHIN, /* per duplicated content, copies - processes holding it */
    KSM_CONTENT_FIELDS
};

/* Keys of equal top hash bits by full hash, positions ascending within a hash: an insertion
 * sort, since hashes that agree in their top 32 bits but differ below are rare (about one
 * pair in 2^32) and a run of equal hashes is already in order. */
static void ksm_sort_run(uint64_t *keys, size_t n, const uint64_t *hashes)
{
    for (size_t i = 1; i < n; i++) {
        uint64_t key = keys[i], hash = hashes[KSM_POSITION(key)];
        size_t j = i;
        for (; j > 0 && hashes[KSM_POSITION(keys[j - 1])] > hash; j--)
            keys[j] = keys[j - 1];
        keys[j] = key;
    }
}

/* One content: the keys of its `copies` pages, positions ascending. */
static void ksm_mark_content(const uint64_t *keys, size_t copies, uint64_t hash, const uint64_t *offsets, size_t nprocs,
                             uint8_t *kinds, uint64_t *totals)
{
    uint8_t kind = 0;
    totals[KSM_C_CONTENTS]++;
    if (hash == 0) {
        kind = KSM_K_ZERO;
        totals[KSM_C_ZERO] += copies;
    } else if (copies > 1) {
        size_t procs = 0, last = SIZE_MAX;
        for (size_t e = 0; e < copies; e++) {
            size_t p = ksm_proc_of(offsets, nprocs, KSM_POSITION(keys[e]));
            procs += p != last;
            last = p;
        }
        kind = KSM_K_DUP | (procs > 1 ? KSM_K_ACROSS : KSM_K_WITHIN);
        totals[KSM_C_DUP_PAGES] += copies;
        totals[KSM_C_DUP_CONTENTS]++;
        totals[procs > 1 ? KSM_C_ACROSS_PAGES : KSM_C_WITHIN_PAGES] += copies;
        totals[KSM_C_SAVING_ACROSS] += procs - 1;
        totals[KSM_C_SAVING_WITHIN] += copies - procs;
    }
    for (size_t e = 0; e < copies; e++)
        kinds[KSM_POSITION(keys[e])] = kind;
}

/* Groups the pages of a set by content. keys: ksm_sort_hashes of hashes (reordered here
 * within runs of equal top bits); process p owns positions [offsets[p], offsets[p+1]). Sets
 * kinds[position] (KSM_K_ZERO, _DUP, _ACROSS, _WITHIN) and adds to totals
 * (KSM_CONTENT_FIELDS, zeroed by the caller). */
static void ksm_group_contents(uint64_t *keys, size_t n, const uint64_t *hashes, const uint64_t *offsets, size_t nprocs,
                               uint8_t *kinds, uint64_t *totals)
{
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && keys[j] >> 32 == keys[i] >> 32)
            j++;
        ksm_sort_run(keys + i, j - i, hashes);
        for (size_t a = i; a < j;) {
            uint64_t hash = hashes[KSM_POSITION(keys[a])];
            size_t b = a + 1;
            while (b < j && hashes[KSM_POSITION(keys[b])] == hash)
                b++;
            ksm_mark_content(keys + a, b - a, hash, offsets, nprocs, kinds, totals);
            a = b;
        }
        i = j;
    }
}

/* Adds to kinds[] what backs each page. keys: ksm_sort_pfns of the pages' PFNs; flags: the
 * /proc/kpageflags word of each distinct PFN, ascending (ksm_distinct_pfns order). A frame
 * is shared if two pages of the set map it or it is a KSM page or the zero page (mapped
 * elsewhere too); a zero or duplicate page on a frame nothing shares is KSM_K_UNMERGED. */
static void ksm_mark_frames(const uint64_t *keys, size_t n, const uint64_t *flags, uint64_t ksm_mask,
                            uint64_t zero_mask, uint8_t *kinds)
{
    size_t frame = 0;
    for (size_t i = 0; i < n; frame++) {
        size_t j = i + 1;
        while (j < n && keys[j] >> 32 == keys[i] >> 32)
            j++;
        uint8_t bits = (flags[frame] & ksm_mask ? KSM_K_KSM : 0) | (flags[frame] & zero_mask ? KSM_K_ZERO_FRAME : 0);
        int shared = j - i > 1 || bits;
        for (size_t e = i; e < j; e++) {
            uint8_t *kind = &kinds[KSM_POSITION(keys[e])];
            *kind |= bits;
            if (!shared && (*kind & (KSM_K_ZERO | KSM_K_DUP)))
                *kind |= KSM_K_UNMERGED;
        }
        i = j;
    }
}

/* Per range r of positions [offsets[r], offsets[r+1]): out[r * KSM_KIND_BITS + b] = its pages
 * whose kind has bit b. */
static void ksm_count_kind_bits(const uint8_t *kinds, const uint64_t *offsets, size_t nranges, uint64_t *out)
{
    for (size_t r = 0; r < nranges; r++) {
        uint64_t *row = out + r * KSM_KIND_BITS;
        memset(row, 0, KSM_KIND_BITS * sizeof *row);
        for (uint64_t e = offsets[r]; e < offsets[r + 1]; e++)
            for (int b = 0; kinds[e] >> b; b++)
                row[b] += kinds[e] >> b & 1;
    }
}

/* ---- content-defined chunks (ksmpreload/layout.py): equal bytes at any offset ------------- */

/* A chunk ends where the gear hash of the bytes read since its first KSM_CDC_MIN has its low
 * KSM_CDC_MASK bits zero (about every 1 KiB), or at KSM_CDC_MAX bytes. The hash shifts one bit
 * a byte, so it depends on the last 64 bytes only: equal data gives the same boundaries
 * wherever it starts, once past its first chunk. */
#define KSM_CDC_MIN 256
#define KSM_CDC_MAX 8192
#define KSM_CDC_MASK ((1ull << 10) - 1)

static uint64_t ksm_gear[256];

/* At load, before any thread can cut (cutting runs on several threads, without the GIL). */
__attribute__((constructor)) static void ksm_gear_init(void)
{
    uint64_t state = 0x243F6A8885A308D3ull; /* splitmix64: a fixed table, the same in every run */
    for (int i = 0; i < 256; i++) {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ z >> 27) * 0x94D049BB133111EBull;
        ksm_gear[i] = z ^ z >> 31;
    }
}

/* XXH64-like hash of `bytes` bytes (any length); 0 when every byte is zero. */
static uint64_t ksm_hash_bytes(const unsigned char *p, size_t bytes)
{
    uint64_t h = KSM_XXH_P1 + bytes, any = 0;
    size_t at = 0;
    for (; at + 8 <= bytes; at += 8) {
        uint64_t word = ksm_load64(p + at);
        any |= word;
        h = ksm_rotl(h ^ ksm_xxh_round(0, word), 27) * KSM_XXH_P1 + KSM_XXH_P4;
    }
    for (; at < bytes; at++) {
        any |= p[at];
        h = ksm_rotl(h ^ p[at] * KSM_XXH_P1, 11) * KSM_XXH_P2;
    }
    if (!any)
        return 0;
    h = (h ^ h >> 33) * KSM_XXH_P2;
    h = (h ^ h >> 29) * KSM_XXH_P3;
    h ^= h >> 32;
    return h ? h : 1;
}

struct ksm_chunk {
    uint64_t hash;   /* 0: all zero bytes */
    uint16_t length; /* at most KSM_CDC_MAX */
    uint16_t offset; /* where it starts in buf, modulo 65536: buf starts on a page boundary, so
                        modulo the page size (up to 64 KiB) this is its offset in its page */
    uint32_t owner;  /* the process it was read from, as the caller numbers them */
};

/* Cuts buf[0..n) into content-defined chunks, written to out[] with `owner`, at most `cap`
 * (n / KSM_CDC_MIN + 1 always suffice). Returns the number of chunks. */
static size_t ksm_cdc_chunks(const unsigned char *buf, size_t n, uint32_t owner, struct ksm_chunk *out, size_t cap)
{
    size_t count = 0, start = 0;
    while (start < n && count < cap) {
        size_t limit = n - start > KSM_CDC_MAX ? start + KSM_CDC_MAX : n;
        size_t end = n - start > KSM_CDC_MIN ? start + KSM_CDC_MIN : n;
        uint64_t h = 0;
        while (end < limit) {
            h = (h << 1) + ksm_gear[buf[end++]];
            if (!(h & KSM_CDC_MASK))
                break;
        }
        out[count++] = (struct ksm_chunk){ksm_hash_bytes(buf + start, end - start), (uint16_t)(end - start),
                                          (uint16_t)start, owner};
        start = end;
    }
    return count;
}

/* Chunk keys: the top 32 bits of the chunk's hash << 32 | its position, sorted by hash, then
 * position (ksm_radix_sort_high is stable; equal top bits with other low bits, about one pair
 * in 2^32, are put in order by an insertion sort). */
static int ksm_sort_chunks(const struct ksm_chunk *chunks, size_t n, uint64_t *keys, uint64_t *tmp)
{
    if ((uint64_t)n > UINT32_MAX)
        return -ERANGE;
    for (size_t i = 0; i < n; i++)
        keys[i] = (chunks[i].hash & ~(uint64_t)UINT32_MAX) | (uint64_t)i;
    int failed = ksm_radix_sort_high(keys, n, tmp, 32);
    for (size_t i = 1; !failed && i < n; i++) {
        uint64_t key = keys[i], hash = chunks[KSM_POSITION(key)].hash;
        size_t j = i;
        for (; j > 0 && keys[j - 1] >> 32 == key >> 32 && chunks[KSM_POSITION(keys[j - 1])].hash > hash; j--)
            keys[j] = keys[j - 1];
        keys[j] = key;
    }
    return failed;
}

/* Placement of a chunk (ksm_chunk_analysis' placement[]): KSM_UNIQUE, or how many of its copies
 * beyond the first sit at other page offsets than the most common one, in KSM_ELSEWHERE_ALL-ths
 * (0: every copy in place, where as-is pages can be equal; KSM_ELSEWHERE_ALL: all apart). */
enum { KSM_ELSEWHERE_ALL = 254, KSM_UNIQUE = 255 };

/* How many of the c copies at keys[0..c) start at the most common offset in their pages. */
static size_t ksm_copies_in_place(const struct ksm_chunk *chunks, const uint64_t *keys, size_t c, uint64_t page)
{
    size_t best = 1;
    for (size_t a = 0; a < c && best < c - a; a++) {
        uint64_t offset = chunks[KSM_POSITION(keys[a])].offset & (page - 1);
        size_t same = 1;
        for (size_t b = a + 1; b < c; b++)
            same += (chunks[KSM_POSITION(keys[b])].offset & (page - 1)) == offset;
        best = same > best ? same : best;
    }
    return best;
}

/* Scratch of ksm_group_chunks: the processes holding one content. */
struct ksm_holders {
    uint32_t *process;
    size_t count;
};

/* One content's copies, the chunks at the positions of keys[0..c) (ascending, so their owners
 * and processes ascend too): each copy's owner gets its fair share, (c - 1)/c of the length, in
 * per_owner[2 * owner], and the part of it at other offsets (placement / KSM_ELSEWHERE_ALL) in
 * [2 * owner + 1]; each pair of processes holding it gets the length once in pairs[p][q] and
 * [q][p]. Returns the placement. */
static int ksm_credit_copies(const struct ksm_chunk *chunks, const uint64_t *keys, size_t c, const uint32_t *process_of,
                             uint64_t page, uint64_t *per_owner, uint64_t *pairs, size_t processes,
                             struct ksm_holders *held)
{
    const struct ksm_chunk *first = &chunks[KSM_POSITION(keys[0])];
    uint64_t share = (uint64_t)(c - 1) * first->length / c;
    size_t apart = c - ksm_copies_in_place(chunks, keys, c, page);
    int placed = (int)((apart * KSM_ELSEWHERE_ALL + (c - 1) / 2) / (c - 1));
    held->count = 0;
    for (size_t k = 0; k < c; k++) {
        uint32_t owner = chunks[KSM_POSITION(keys[k])].owner, process = process_of[owner];
        per_owner[2 * owner] += share;
        per_owner[2 * owner + 1] += share * (uint64_t)placed / KSM_ELSEWHERE_ALL;
        if (!held->count || held->process[held->count - 1] != process)
            held->process[held->count++] = process;
    }
    for (size_t a = 0; a < held->count; a++)
        for (size_t b = a + 1; b < held->count; b++) {
            pairs[held->process[a] * processes + held->process[b]] += first->length;
            pairs[held->process[b] * processes + held->process[a]] += first->length;
        }
    return placed;
}

/* Groups the chunks by content (keys from ksm_sort_chunks): dup_totals[0] += what storing each
 * distinct content once would save, [1] of it for contents held by two processes or more, [2]
 * by one, [3] += the bytes of all-zero chunks (not duplicates); per_owner and pairs as
 * ksm_credit_copies says; placement[position] as its enum says. Returns 0 or -ENOMEM. */
static int ksm_group_chunks(const struct ksm_chunk *chunks, const uint64_t *keys, size_t n, const uint32_t *process_of,
                            size_t processes, uint64_t page, uint64_t *dup_totals, uint64_t *per_owner, uint64_t *pairs,
                            uint8_t *placement)
{
    struct ksm_holders held = {malloc((processes ? processes : 1) * sizeof *held.process), 0};
    if (!held.process)
        return -ENOMEM;
    for (size_t i = 0; i < n;) {
        const struct ksm_chunk *first = &chunks[KSM_POSITION(keys[i])];
        size_t j = i + 1;
        while (j < n && chunks[KSM_POSITION(keys[j])].hash == first->hash)
            j++;
        int placed = KSM_UNIQUE;
        if (!first->hash) {
            for (size_t k = i; k < j; k++)
                dup_totals[3] += chunks[KSM_POSITION(keys[k])].length;
        } else if (j - i > 1) {
            uint64_t saved = (uint64_t)(j - i - 1) * first->length;
            const struct ksm_chunk *last = &chunks[KSM_POSITION(keys[j - 1])];
            dup_totals[0] += saved;
            dup_totals[process_of[first->owner] != process_of[last->owner] ? 1 : 2] += saved;
            placed = ksm_credit_copies(chunks, keys + i, j - i, process_of, page, per_owner, pairs, processes, &held);
        }
        for (size_t k = i; k < j; k++)
            placement[KSM_POSITION(keys[k])] = (uint8_t)placed;
        i = j;
    }
    free(held.process);
    return 0;
}

/* The bytes of a block beyond the run of duplicate chunks found inside it: at each end, the part
 * in a chunk that also holds bytes outside the block. A block's edge falls at a random point of
 * a chunk, whose expected remainder is sum(l^2) / (2 sum(l)) (a renewal process's mean
 * residual); two ends: sum(l^2) / sum(l), over the duplicate chunks (the runs' own content:
 * other memory, repetitive or sparse, makes chunks of the longest length far more often). */
static uint64_t ksm_run_edges(const struct ksm_chunk *chunks, const uint8_t *placement, size_t n)
{
    double sum = 0, squares = 0;
    for (size_t i = 0; i < n; i++) {
        if (placement[i] == KSM_UNIQUE)
            continue;
        sum += chunks[i].length;
        squares += (double)chunks[i].length * chunks[i].length;
    }
    return sum > 0 ? (uint64_t)(squares / sum) : 0;
}

/* An owner's flags (ksm_chunk_analysis' owner_flags[]). */
enum {
    KSM_WHOLE_LAST_PAGE = 1, /* its allocator gives large blocks whole pages: a partial last page ends in
                                bytes never written */
    KSM_SLAB_ITEMS = 2       /* memcached's slabs: what slab classes of whole pages would merge is counted */
};

/* One run of duplicate chunks, ended: the block that holds it is estimated at `run` bytes plus
 * `edges`; from the threshold up ksm-wrap page-aligns it, and its pages (the last, partial one
 * too with KSM_WHOLE_LAST_PAGE) can then merge: totals[0], counted for the part of the run whose
 * copies are not in place now (misplaced bytes), totals[1] the runs. With KSM_SLAB_ITEMS the
 * block is a memcached item, which ksm-wrap does not move (it aligns the 1 MiB slab pages only): in slab classes of whole pages every item starts at one offset in
 * its page whatever the order it was stored in, so all its pages but the first (its header:
 * pointers and times that differ between servers) can merge, the partial last one included (the
 * rest of the slot was never written): totals[5]. */
static void ksm_count_run(uint64_t run, uint64_t misplaced, uint64_t edges, uint64_t page, uint64_t min_run, int flags,
                          uint64_t *totals)
{
    uint64_t block = run + edges, pages_touched = (block + page - 1) / page;
    if (!run)
        return;
    if (flags & KSM_SLAB_ITEMS) { /* items are not blocks of the allocator: ksm-wrap does not move them */
        totals[5] += (pages_touched - 1) * page;
        return;
    }
    if (block < min_run || !misplaced)
        return;
    uint64_t pages = flags & KSM_WHOLE_LAST_PAGE ? pages_touched : block / page;
    totals[0] += (uint64_t)((double)pages * page * misplaced / run);
    totals[1]++;
}

/* What page-aligning the blocks that hold duplicate content would add to what can merge now,
 * walking the chunks in the order they were read: a run is consecutive duplicate chunks of one
 * owner (the content of one block, as far as chunks can tell); ksm_count_run says what it adds.
 * run_totals[0] += those bytes (for every copy), [1] += the runs counted, [2] += the bytes of all
 * duplicate chunks (every copy), [3] += those of chunks in place, [4] = the edge estimate, [5] +=
 * the slab item pages of KSM_SLAB_ITEMS owners. */
static void ksm_count_runs(const struct ksm_chunk *chunks, const uint8_t *placement, size_t n, uint64_t page,
                           uint64_t min_run, const uint8_t *owner_flags, uint64_t *run_totals)
{
    uint64_t edges = ksm_run_edges(chunks, placement, n), run = 0, misplaced = 0;
    run_totals[4] = edges;
    for (size_t i = 0; i <= n; i++) {
        int placed = i < n ? placement[i] : KSM_UNIQUE, duplicate = placed != KSM_UNIQUE;
        uint64_t length = i < n ? chunks[i].length : 0;
        uint64_t elsewhere = duplicate ? length * (uint64_t)placed / KSM_ELSEWHERE_ALL : 0;
        if (duplicate) {
            run_totals[2] += length;
            run_totals[3] += placed == 0 ? length : 0;
        }
        if (duplicate && (run == 0 || chunks[i].owner == chunks[i - 1].owner)) {
            run += length;
            misplaced += elsewhere;
            continue;
        }
        if (i > 0)
            ksm_count_run(run, misplaced, edges, page, min_run, owner_flags[chunks[i - 1].owner], run_totals);
        run = duplicate ? length : 0;
        misplaced = elsewhere;
    }
}

/* Everything ksmpreload/layout.py counts of the chunks, given in the order they were read (not
 * changed): owners are regions, numbered in read order, process_of[owner] their process (0 to
 * processes - 1); owner_flags[owner]: KSM_WHOLE_LAST_PAGE, KSM_SLAB_ITEMS.
 * run_totals (6 words) as ksm_count_runs, dup_totals (4), per_owner (2 words an owner) and pairs
 * (processes x processes) as ksm_group_chunks; all added to (the caller zeroes them). One radix
 * sort of 8-byte keys, and n bytes of placement: 17 bytes a chunk for the call. Returns 0,
 * -ERANGE (more than 2^32 chunks) or -ENOMEM. */
static int ksm_chunk_analysis(const struct ksm_chunk *chunks, size_t n, const uint32_t *process_of, size_t processes,
                              uint64_t page, uint64_t min_run, const uint8_t *owner_flags, uint64_t *run_totals,
                              uint64_t *dup_totals, uint64_t *per_owner, uint64_t *pairs)
{
    uint64_t *keys = malloc((n ? n : 1) * sizeof *keys), *tmp = malloc((n ? n : 1) * sizeof *tmp);
    uint8_t *placement = malloc(n ? n : 1);
    int failed = keys && tmp && placement ? ksm_sort_chunks(chunks, n, keys, tmp) : -ENOMEM;
    if (!failed)
        failed =
            ksm_group_chunks(chunks, keys, n, process_of, processes, page, dup_totals, per_owner, pairs, placement);
    if (!failed)
        ksm_count_runs(chunks, placement, n, page, min_run, owner_flags, run_totals);
    free(keys);
    free(tmp);
    free(placement);
    return failed;
}

/* A set of page frame numbers (layout.py reads a frame once): open addressing, 8 bytes a slot,
 * at most half full. */
struct ksm_frame_set {
    uint64_t *slots; /* 0: empty (frame 0 is never stored) */
    size_t capacity, count;
};

static struct ksm_frame_set *ksm_frame_set_new(void) { return calloc(1, sizeof(struct ksm_frame_set)); }

static void ksm_frame_set_free(struct ksm_frame_set *set)
{
    if (set)
        free(set->slots);
    free(set);
}

static size_t ksm_frame_slot(const struct ksm_frame_set *set, uint64_t frame)
{
    size_t at = (size_t)(frame * 0x9E3779B97F4A7C15ull) & (set->capacity - 1);
    while (set->slots[at] && set->slots[at] != frame)
        at = (at + 1) & (set->capacity - 1);
    return at;
}

static int ksm_frame_set_grow(struct ksm_frame_set *set)
{
    size_t old_capacity = set->capacity, capacity = old_capacity ? 2 * old_capacity : 1 << 16;
    uint64_t *old = set->slots;
    set->slots = calloc(capacity, sizeof *set->slots);
    if (!set->slots) {
        set->slots = old;
        return -ENOMEM;
    }
    set->capacity = capacity;
    for (size_t i = 0; i < old_capacity; i++)
        if (old[i])
            set->slots[ksm_frame_slot(set, old[i])] = old[i];
    free(old);
    return 0;
}

/* Of n pages (frames[i] mapped at page number pages[i]), writes to out[] the page numbers of
 * those whose frame the set has not seen, and adds their frames; frame 0 (a number the kernel
 * did not show) is always new. Returns how many, or -ENOMEM. */
static long ksm_frame_set_filter(struct ksm_frame_set *set, const uint64_t *frames, const uint64_t *pages, size_t n,
                                 uint64_t *out)
{
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (frames[i]) {
            if (2 * (set->count + 1) > set->capacity && ksm_frame_set_grow(set) != 0)
                return -ENOMEM;
            size_t at = ksm_frame_slot(set, frames[i]);
            if (set->slots[at])
                continue;
            set->slots[at] = frames[i];
            set->count++;
        }
        out[kept++] = pages[i];
    }
    return (long)kept;
}
