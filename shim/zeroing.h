#ifndef KSMPRELOAD_ZEROING_H
#define KSMPRELOAD_ZEROING_H

#include <stddef.h>

/* Clears a page-aligned block of private anonymous memory for calloc, leaving the pages that
 * were never used (zero already) untouched; errno may change. */
void ksm_clear_block(unsigned char *block, size_t size, size_t page_size);

#endif
