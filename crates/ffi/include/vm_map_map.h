/*
 * vm_map_map.h - PhantomOS's 64-bit page table, implemented by pagesnap (crates/ffi).
 *
 * Link with libvm_map_map.a (or -lvm_map_map for the shared library) and, for the static library,
 * -lpthread -ldl -lm. Every function is safe to call from several threads at once. See
 * docs/c-api.md for ownership and threading rules.
 */
#ifndef PAGESNAP_VM_MAP_MAP_H
#define PAGESNAP_VM_MAP_MAP_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint64_t physaddr_t;
typedef uint64_t disk_page_no_t;

/*
 * A page descriptor (72 bytes). Flags are one byte each so that the layout is fixed across
 * compilers (PhantomOS's 1-bit bitfields have implementation-defined layout); code that reads or
 * assigns p->flag_phys_dirty reads the same. Any non-zero flag value means "set".
 */
typedef struct vm_page {
    void *virt_addr;            /* first address of the page */
    physaddr_t phys_addr;       /* physical address, when flag_phys_mem */
    disk_page_no_t curr_page;   /* disk copy of the current state */
    disk_page_no_t make_page;   /* disk copy for the snapshot being made */
    disk_page_no_t prev_page;   /* disk copy in the previous snapshot */
    uint64_t epoch;             /* epoch of the last modification */
    uint32_t access_count;
    uint32_t idle_count;
    uint32_t wired_count;
    uint8_t flag_pager_io_busy;
    uint8_t flag_phys_mem;
    uint8_t flag_phys_protect;
    uint8_t flag_phys_dirty;
    uint8_t flag_have_curr;
    uint8_t flag_have_make;
    uint8_t flag_have_prev;
    uint8_t reserved;           /* always 0 */
} vm_page;

typedef void (*vmem_page_func_t)(vm_page *p);

/* Error results of vm_map_set_page, vm_map_get_page and vm_map_remove_page. */
#define VM_MAP_ERR_NULL (-1)           /* a required pointer is NULL */
#define VM_MAP_ERR_FULL (-2)           /* the table holds 2^32 - 2 mappings */
#define VM_MAP_ERR_IN_LOCKED_WALK (-3) /* called from func of vm_map_map_do_for_all(func, lock != 0) */

/* Creates the page table. Calling it again does nothing; the other functions call it if needed. */
void vm_map_map_init(void);

/*
 * A newly allocated descriptor for the page containing v_addr: all flags and counters zero. Owned
 * by the caller, released with vm_map_page_free. It is not in the table until set_page stores it.
 * Returns NULL only if memory is exhausted.
 */
vm_page *vm_map_page_init(void *v_addr);

/* Releases a descriptor from vm_map_page_init. NULL is ignored. */
void vm_map_page_free(vm_page *p);

/*
 * Stores a copy of *new_page under the page containing new_page->virt_addr (insert or replace).
 * Waits while a locked vm_map_map_do_for_all runs on another thread. NULL is ignored. The table
 * never drops a mapping: if it cannot store this one (2^32 - 2 mappings held) it aborts the process
 * rather than lose it. Called from func of vm_map_map_do_for_all(func, lock != 0) it would wait for
 * itself forever, so it aborts the process with a message naming the misuse. Use vm_map_set_page to
 * get an error instead in both cases.
 */
void set_page(vm_page *new_page);

/*
 * Like set_page, with a result: 0 stored, VM_MAP_ERR_NULL (-1) new_page is NULL, VM_MAP_ERR_FULL
 * (-2) the table is full, VM_MAP_ERR_IN_LOCKED_WALK (-3) called from func of
 * vm_map_map_do_for_all(func, lock != 0) on the walking thread (nothing stored; change *p instead).
 */
int vm_map_set_page(const vm_page *new_page);

/*
 * A copy of the descriptor of the page containing v_addr. For a page never set (or removed) it is
 * PhantomOS's "not allocated": virt_addr is the page's address, phys_addr 0, all else zero.
 */
vm_page get_page(void *v_addr);

/* Copies the descriptor of the page containing v_addr into *out: 1 if mapped, 0 if not, -1 if out is NULL. */
int vm_map_get_page(void *v_addr, vm_page *out);

/*
 * Removes the mapping of the page containing v_addr: 1 if it was mapped, 0 if not,
 * VM_MAP_ERR_IN_LOCKED_WALK (-3) if called from func of vm_map_map_do_for_all(func, lock != 0)
 * (nothing removed).
 */
int vm_map_remove_page(void *v_addr);

/* How many pages are mapped. */
uint64_t vm_map_page_count(void);

/*
 * Calls func once for every mapping. lock != 0: set_page and the other writers on other threads
 * wait until the walk ends, and changes func makes to *p are stored (virt_addr cannot change).
 * lock == 0: nothing is held; func sees a consistent copy, and its changes are not stored. NULL is
 * ignored. When lock != 0, func must not call a writer (it would wait for itself): vm_map_set_page
 * and vm_map_remove_page return VM_MAP_ERR_IN_LOCKED_WALK, and set_page or a nested
 * vm_map_map_do_for_all with lock != 0 abort the process with a message. Readers (get_page,
 * vm_map_get_page, vm_map_page_count), vm_map_page_init/vm_map_page_free and a nested walk with
 * lock == 0 are fine.
 */
void vm_map_map_do_for_all(vmem_page_func_t func, int lock);

#ifdef __cplusplus
}
#endif

#endif /* PAGESNAP_VM_MAP_MAP_H */
