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

static int ksm_prctl_set_merge(int enable)
{
    return prctl(PR_SET_MEMORY_MERGE, enable, 0, 0, 0) == 0 ? 0 : -errno;
}

static int ksm_prctl_get_merge(void)
{
    int merge = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
    return merge >= 0 ? merge : -errno;
}

static int ksm_madvise_mergeable(void *addr, size_t length)
{
    return madvise(addr, length, MADV_MERGEABLE) == 0 ? 0 : -errno;
}

static long ksm_page_size(void)
{
    return sysconf(_SC_PAGESIZE);
}

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

struct ksm_page_region {      /* struct page_region, include/uapi/linux/fs.h (Linux 6.7+) */
    uint64_t start, end, categories;
};

struct ksm_pm_scan_arg {      /* struct pm_scan_arg */
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
 * PFNs (entry & pfn_mask), appended to out in address order. Reads buf_words entries per
 * pread. Stops before out could overflow: *next is the first page not looked at, so the
 * caller grows out and calls again. counts[0] += entries kept, counts[1] += kept entries
 * whose PFN reads as 0 (what an unprivileged reader gets). Returns the PFNs appended or
 * -errno. */
static long ksm_pagemap_read(int fd, uint64_t first, uint64_t end, uint64_t *buf, size_t buf_words,
                             uint64_t keep_mask, uint64_t keep_value, uint64_t pfn_mask,
                             uint64_t *out, size_t out_cap, uint64_t *next, uint64_t *counts)
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
                out[kept++] = pfn;
                counts[1] += pfn == 0;
            }
        }
        if (words < want) {         /* end of the address space the file shows */
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
static long ksm_pagemap_read_present(int fd, uint64_t first, uint64_t end, long page_size,
                                     uint64_t *buf, size_t buf_words,
                                     uint64_t keep_mask, uint64_t keep_value, uint64_t pfn_mask,
                                     uint64_t *out, size_t out_cap, uint64_t *next, uint64_t *counts)
{
    struct ksm_page_region ranges[KSM_SCAN_RANGES];
    size_t kept = 0;
    uint64_t page = first;
    while (page < end) {
        struct ksm_pm_scan_arg arg = {
            .size = sizeof arg, .start = page * (uint64_t)page_size, .end = end * (uint64_t)page_size,
            .vec = (uint64_t)(uintptr_t)ranges, .vec_len = KSM_SCAN_RANGES,
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
            long got = ksm_pagemap_read(fd, from, to, buf, buf_words, keep_mask, keep_value, pfn_mask,
                                        out + kept, out_cap - kept, &stop, counts);
            if (got < 0)
                return got;
            kept += (size_t)got;
            if (stop < to) {        /* out is full */
                *next = stop;
                return (long)kept;
            }
            page = to;
        }
        if (walked <= page && found == 0)
            walked = end;           /* nothing more, whatever walk_end says */
        page = walked > page ? walked : page;
    }
    *next = page;
    return (long)kept;
}

/* Sorts PFNs by value with their positions: keys[i] = pfn << 32 | position, ascending by
 * PFN and, for one PFN, by position (a stable LSD radix sort on the PFN bits only, in as few
 * passes of at most 12 bits as the largest PFN needs: two up to 64 GiB of RAM). tmp has n
 * words. Returns 0, or -ERANGE if a PFN or n does not fit in 32 bits (16 TiB). */
static int ksm_sort_pfns(const uint64_t *pfns, size_t n, uint64_t *keys, uint64_t *tmp)
{
    enum { MAX_DIGIT = 12 };
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
static int ksm_read_pfn_words(int fd, const uint64_t *pfns, size_t n, uint64_t max_gap,
                              uint64_t *buf, size_t buf_words, uint64_t *out)
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
static size_t ksm_select_pfns(const uint64_t *pfns, const uint64_t *words, size_t n, uint64_t mask,
                              uint64_t *out)
{
    size_t selected = 0;
    for (size_t i = 0; i < n; i++)
        if (words[i] & mask)
            out[selected++] = pfns[i];
    return selected;
}

/* Per-process fields of ksm_attribute's per_proc (KSM_PROC_FIELDS per process). */
enum {
    KSM_P_MAPPED,        /* pages of the process that map a KSM page (ksm_merging_pages) */
    KSM_P_DISTINCT,      /* distinct KSM pages it maps */
    KSM_P_SHARED_IN_SET, /* ... of which another process of the set maps too */
    KSM_P_WITHIN_ONLY,   /* ... mapped more than once here and by no other process of the set */
    KSM_P_WITHIN_ONLY_MAPPED, /* its pages mapping those */
    KSM_P_OUTSIDE,       /* distinct KSM pages also mapped by processes outside the set */
    KSM_P_LONE,          /* distinct KSM pages mapped once in all (nothing shares them now) */
    KSM_PROC_FIELDS
};

/* Totals of ksm_attribute (KSM_TOTAL_FIELDS). */
enum {
    KSM_T_DISTINCT,      /* distinct KSM pages the set maps */
    KSM_T_MAPPED,        /* pages of the set that map them */
    KSM_T_SHARED,        /* distinct KSM pages mapped by two processes of the set or more */
    KSM_T_WITHIN_ONLY,   /* distinct KSM pages shared inside one process only */
    KSM_T_OUTSIDE,       /* distinct KSM pages also mapped outside the set */
    KSM_T_LONE,          /* distinct KSM pages mapped once in all */
    KSM_TOTAL_FIELDS
};

/* Per page of the set (position in the PFN array), the kind of KSM page it maps. */
enum { KSM_E_KSM = 1, KSM_E_SHARED = 2, KSM_E_WITHIN = 4 };

static size_t ksm_proc_of(const uint64_t *offsets, size_t nprocs, uint64_t position)
{
    size_t low = 0, high = nprocs;   /* offsets[low] <= position < offsets[high] */
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
                         const uint64_t *ksm_pfns, const uint64_t *mapcounts, size_t nksm,
                         uint8_t *entry_kind, uint64_t *per_proc, uint64_t *pairs, uint64_t *totals)
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
        for (size_t a = 0; a < m; a++) {
            uint64_t *row = per_proc + procs[a] * KSM_PROC_FIELDS;
            row[KSM_P_MAPPED] += times[a];
            row[KSM_P_DISTINCT]++;
            row[KSM_P_SHARED_IN_SET] += m > 1;
            row[KSM_P_OUTSIDE] += outside;
            row[KSM_P_LONE] += lone;
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
        i = j;
    }
    free(procs);
    free(times);
    return 0;
}

/* Per range r of positions [offsets[r], offsets[r+1]): out[3r] its pages mapping KSM pages,
 * out[3r+1] those another process of the set maps too, out[3r+2] those shared within the
 * process only. */
static void ksm_count_kinds(const uint8_t *entry_kind, const uint64_t *offsets, size_t nranges,
                            uint64_t *out)
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
