/* calloc's clearing, without making memory resident that was never used: a page of private
 * anonymous memory that is neither present nor swapped out reads as zero, so only the pages
 * that hold something are cleared (/proc/self/pagemap says which), and a present page that
 * is all zero already (the zero page, say) is only read. */
#define _GNU_SOURCE
#include "zeroing.h"
#include "sys.h"

#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define PAGEMAP_PRESENT (1ull << 63)
#define PAGEMAP_SWAPPED (1ull << 62)
#define ENTRIES 512            /* pagemap words read at once: 4 KiB on the stack */
#define WORTH_A_LOOK (1 << 20) /* smaller blocks are cleared outright: three system calls cost more */

static int all_zero(const unsigned char *bytes, size_t length)
{
    return bytes[0] == 0 && memcmp(bytes, bytes + 1, length - 1) == 0;
}

static void clear_if_used(unsigned char *page, size_t length, uint64_t entry)
{
    if ((entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) && !all_zero(page, length))
        memset(page, 0, length);
}

/* Clears [block, block + size), block page-aligned; on any failure to read the pagemap, all of it. */
void ksm_clear_block(unsigned char *block, size_t size, size_t page_size)
{
    int cancel = size < WORTH_A_LOOK ? 0 : ksm_cancel_off(); /* no file: nothing to protect */
    int fd = size < WORTH_A_LOOK ? -1 : open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    size_t done = 0;
    uint64_t entries[ENTRIES];
    while (fd >= 0 && done < size) {
        size_t pages = (size - done + page_size - 1) / page_size;
        pages = pages < ENTRIES ? pages : ENTRIES;
        off_t at = (off_t)(((uintptr_t)block + done) / page_size * sizeof(uint64_t));
        if (pread(fd, entries, pages * sizeof(uint64_t), at) != (ssize_t)(pages * sizeof(uint64_t)))
            break;
        for (size_t i = 0; i < pages; i++, done += page_size)
            clear_if_used(block + done, size - done < page_size ? size - done : page_size, entries[i]);
    }
    if (fd >= 0)
        close(fd);
    if (size >= WORTH_A_LOOK)
        ksm_cancel_restore(cancel);
    if (done < size)
        memset(block + done, 0, size - done);
}
