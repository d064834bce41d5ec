/* The alignment padding of live blocks (padding_bytes, padded_blocks): added
 * when an aligned block is made, taken back when it is freed or reallocated. */
#ifndef KSMPRELOAD_PADDING_H
#define KSMPRELOAD_PADDING_H

#include <stddef.h>

void ksm_padding_start(size_t page_size);
/* The live block at ptr costs `padding` bytes of alignment (0: none, not kept unless the
 * block cache is on and `made`: the shim made the block, and the cache keeps no other). */
void ksm_padding_note(void *ptr, size_t padding, int made);
/* The block at ptr is about to be freed or moved: its padding leaves the gauge and is
 * returned (0 for a block without padding); *made (if given): noted as made by the shim. */
size_t ksm_padding_forget(void *ptr, int *made);

#endif
