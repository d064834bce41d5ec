"""cffi build script for ksmpreload._native: the syscalls the toolkit makes itself, the
page-frame decoding behind ksmpreload.sharing and the page hashing behind ksmpreload.potential
(arrays in, arrays out, no Python per page)."""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef("""
    int ksm_prctl_set_merge(int enable);
    int ksm_prctl_get_merge(void);
    int ksm_madvise_mergeable(void *addr, size_t length);
    long ksm_page_size(void);

    long ksm_pagemap_read(int fd, uint64_t first, uint64_t end, uint64_t *buf, size_t buf_words,
                          uint64_t keep_mask, uint64_t keep_value, uint64_t pfn_mask,
                          uint64_t *out, uint64_t *pages, size_t out_cap, uint64_t *next,
                          uint64_t *counts);
    long ksm_pagemap_read_present(int fd, uint64_t first, uint64_t end, long page_size,
                                  uint64_t *buf, size_t buf_words,
                                  uint64_t keep_mask, uint64_t keep_value, uint64_t pfn_mask,
                                  uint64_t *out, uint64_t *pages, size_t out_cap, uint64_t *next,
                                  uint64_t *counts);
    int ksm_sort_pfns(const uint64_t *pfns, size_t n, uint64_t *keys, uint64_t *tmp);
    size_t ksm_distinct_pfns(const uint64_t *keys, size_t n, uint64_t *out);
    int ksm_read_pfn_words(int fd, const uint64_t *pfns, size_t n, uint64_t max_gap,
                           uint64_t *buf, size_t buf_words, uint64_t *out);
    size_t ksm_select_pfns(const uint64_t *pfns, const uint64_t *words, size_t n, uint64_t mask,
                           uint64_t *out);
    int ksm_attribute(const uint64_t *keys, size_t n, const uint64_t *offsets, size_t nprocs,
                      const uint64_t *ksm_pfns, const uint64_t *mapcounts, size_t nksm,
                      uint8_t *entry_kind, uint64_t *per_proc, uint64_t *pairs, uint64_t *totals);
    void ksm_count_kinds(const uint8_t *entry_kind, const uint64_t *offsets, size_t nranges,
                         uint64_t *out);
    static const int KSM_P_MAPPED, KSM_P_DISTINCT, KSM_P_SHARED_IN_SET, KSM_P_WITHIN_ONLY,
                     KSM_P_WITHIN_ONLY_MAPPED, KSM_P_OUTSIDE, KSM_P_LONE, KSM_P_FAIR_SAVED,
                     KSM_PROC_FIELDS;
    uint64_t ksm_hash_page(const void *page, size_t bytes);
    long ksm_read_hash_pages(int mem_fd, uint64_t *pages, uint64_t *pfns, size_t n, long page_size,
                             unsigned char *buf, size_t buf_pages, uint64_t *hashes, uint64_t *counts,
                             double *seconds);
    int ksm_sort_hashes(const uint64_t *hashes, size_t n, uint64_t *keys, uint64_t *tmp);
    void ksm_group_contents(uint64_t *keys, size_t n, const uint64_t *hashes, const uint64_t *offsets,
                            size_t nprocs, uint8_t *kinds, uint64_t *totals);
    void ksm_mark_frames(const uint64_t *keys, size_t n, const uint64_t *flags, uint64_t ksm_mask,
                         uint64_t zero_mask, uint8_t *kinds);
    void ksm_count_kind_bits(const uint8_t *kinds, const uint64_t *offsets, size_t nranges,
                             uint64_t *out);
    static const int KSM_KIND_BITS, KSM_CONTENT_FIELDS, KSM_WHOLE_LAST_PAGE, KSM_SLAB_ITEMS;
    struct ksm_chunk { uint64_t hash; uint16_t length; uint16_t offset; uint32_t owner; };
    size_t ksm_cdc_chunks(const unsigned char *buf, size_t n, uint32_t owner, struct ksm_chunk *out, size_t cap);
    struct ksm_frame_set;
    struct ksm_frame_set *ksm_frame_set_new(void);
    void ksm_frame_set_free(struct ksm_frame_set *set);
    long ksm_frame_set_filter(struct ksm_frame_set *set, const uint64_t *frames, const uint64_t *pages, size_t n,
                              uint64_t *out);
    int ksm_chunk_analysis(const struct ksm_chunk *chunks, size_t n, const uint32_t *process_of, size_t processes,
                           uint64_t page, uint64_t min_run, const uint8_t *owner_flags, uint64_t *run_totals,
                           uint64_t *dup_totals, uint64_t *per_owner, uint64_t *pairs);
    #define KSM_CDC_MIN ...
    static const int KSM_T_DISTINCT, KSM_T_MAPPED, KSM_T_SHARED, KSM_T_WITHIN_ONLY, KSM_T_OUTSIDE,
                     KSM_T_LONE, KSM_T_FAIR_SAVED, KSM_TOTAL_FIELDS;
    #define KSM_FAIR_UNIT ...
""")
with open(os.path.join(HERE, "native.c")) as source:
    ffibuilder.set_source("ksmpreload._native", source.read(), extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
