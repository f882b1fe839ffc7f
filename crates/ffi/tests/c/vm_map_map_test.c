/*
 * Exercises every function of vm_map_map.h from C. Run by tests/c_api.rs, which compiles it with
 * the system C compiler against libvm_map_map.a.
 *   ./vm_map_map_test layout   prints the struct layout for the Rust side to compare
 *   ./vm_map_map_test          runs the checks; prints "N passed, M failed"; exit 0 iff M == 0
 */
#define _POSIX_C_SOURCE 200809L /* alarm() */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#include "vm_map_map.h"

static int passed, failed;

#define CHECK(cond, ...)                                                             \
    do {                                                                             \
        if (cond) {                                                                  \
            passed++;                                                                \
        } else {                                                                     \
            failed++;                                                                \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                            \
            fprintf(stderr, "\n");                                                   \
        }                                                                            \
    } while (0)

#define PAGE 4096ULL
#define A(x) ((void *)(uintptr_t)(x))

static void print_layout(void) {
    printf("size %zu\n", sizeof(vm_page));
    printf("align %zu\n", _Alignof(vm_page));
#define F(name) printf("%s %zu\n", #name, offsetof(vm_page, name))
    F(virt_addr); F(phys_addr); F(curr_page); F(make_page); F(prev_page); F(epoch);
    F(access_count); F(idle_count); F(wired_count);
    F(flag_pager_io_busy); F(flag_phys_mem); F(flag_phys_protect); F(flag_phys_dirty);
    F(flag_have_curr); F(flag_have_make); F(flag_have_prev); F(reserved);
#undef F
}

static int is_not_allocated(vm_page p, uint64_t addr) {
    return (uint64_t)(uintptr_t)p.virt_addr == (addr & ~(PAGE - 1)) && p.phys_addr == 0 && p.curr_page == 0 &&
           p.make_page == 0 && p.prev_page == 0 && p.access_count == 0 && p.idle_count == 0 &&
           p.wired_count == 0 && !p.flag_phys_mem && !p.flag_phys_dirty && !p.flag_pager_io_busy &&
           !p.flag_phys_protect && !p.flag_have_curr && !p.flag_have_make && !p.flag_have_prev;
}

static void store(uint64_t addr, uint64_t value) {
    vm_page *p = vm_map_page_init(A(addr));
    p->phys_addr = value * PAGE;
    p->curr_page = value;
    p->access_count = (uint32_t)value;
    p->flag_phys_mem = 1;
    set_page(p);
    vm_map_page_free(p);
}

static int holds(uint64_t addr, uint64_t value) {
    vm_page p;
    if (vm_map_get_page(A(addr), &p) != 1) return 0;
    return p.phys_addr == value * PAGE && p.curr_page == value && p.access_count == (uint32_t)value &&
           p.flag_phys_mem == 1 && (uint64_t)(uintptr_t)p.virt_addr == (addr & ~(PAGE - 1));
}

static void test_basics(void) {
    vm_map_map_init();
    vm_map_map_init(); /* twice is harmless */
    CHECK(vm_map_page_count() == 0, "count %llu", (unsigned long long)vm_map_page_count());

    vm_page *p = vm_map_page_init(A(0x12345678));
    CHECK(p != NULL, "page_init returned NULL");
    CHECK(is_not_allocated(*p, 0x12345678), "fresh descriptor not zero");
    CHECK(vm_map_page_count() == 0, "page_init must not store");
    p->phys_addr = 0xabc000;
    p->flag_phys_mem = 1;
    p->flag_have_prev = 7; /* any non-zero value is "set" */
    p->prev_page = 99;
    p->wired_count = 3;
    set_page(p);
    vm_map_page_free(p);
    vm_map_page_free(NULL);

    vm_page g = get_page(A(0x12345fff));
    CHECK((uint64_t)(uintptr_t)g.virt_addr == 0x12345000, "virt_addr %p", g.virt_addr);
    CHECK(g.phys_addr == 0xabc000 && g.prev_page == 99 && g.wired_count == 3, "fields lost");
    CHECK(g.flag_phys_mem == 1 && g.flag_have_prev == 1 && g.flag_phys_dirty == 0, "flags");
    CHECK(vm_map_page_count() == 1, "count after set");

    /* Replace keeps one mapping. */
    g.wired_count = 4;
    set_page(&g);
    CHECK(vm_map_page_count() == 1 && get_page(A(0x12345000)).wired_count == 4, "replace");

    /* Never-set pages are "not allocated". */
    CHECK(is_not_allocated(get_page(A(0x7777777)), 0x7777777), "unset page");
    vm_page out;
    memset(&out, 0xee, sizeof out);
    CHECK(vm_map_get_page(A(0x7777777), &out) == 0, "get of unset page");
    CHECK(vm_map_get_page(A(0x12345000), NULL) == -1, "NULL out");
    CHECK(vm_map_set_page(NULL) == -1, "NULL set");
    set_page(NULL);
    vm_map_map_do_for_all(NULL, 1);

    /* Addresses at the top of the 64-bit space. */
    store(UINT64_MAX, 5);
    CHECK(holds(UINT64_MAX - 1, 5), "top page");
    CHECK(vm_map_remove_page(A(UINT64_MAX)) == 1, "remove top");
    CHECK(vm_map_remove_page(A(UINT64_MAX)) == 0, "remove twice");
    CHECK(vm_map_remove_page(A(0x12345000)) == 1, "remove");
    CHECK(is_not_allocated(get_page(A(0x12345000)), 0x12345000), "removed page is not allocated");
    CHECK(vm_map_page_count() == 0, "count after removes");
}

/* A writer called from func of a locked walk gets an error instead of waiting for itself. */
static int reentry_calls, reentry_wrong;
static void call_writers(vm_page *p) {
    vm_page c = *p;
    c.wired_count = 77;
    reentry_calls++;
    reentry_wrong += vm_map_set_page(&c) != VM_MAP_ERR_IN_LOCKED_WALK;
    reentry_wrong += vm_map_remove_page(c.virt_addr) != VM_MAP_ERR_IN_LOCKED_WALK;
    vm_page q;
    reentry_wrong += vm_map_get_page(c.virt_addr, &q) != 1; /* readers are fine */
}

static void test_reentry(void) {
    alarm(30); /* watchdog: a self-deadlock ends the run with SIGALRM instead of hanging it */
    store(0x500000000000ULL, 9);
    reentry_calls = reentry_wrong = 0;
    vm_map_map_do_for_all(call_writers, 1);
    CHECK(reentry_calls == 1 && reentry_wrong == 0, "%d calls, %d wrong results", reentry_calls, reentry_wrong);
    CHECK(holds(0x500000000000ULL, 9) && get_page(A(0x500000000000ULL)).wired_count == 0,
          "a refused writer changed the page");
    /* After the walk, and in an unlocked walk, writers work. */
    vm_page p = get_page(A(0x500000000000ULL));
    p.wired_count = 5;
    CHECK(vm_map_set_page(&p) == 0, "set after the walk");
    CHECK(vm_map_remove_page(A(0x500000000000ULL)) == 1, "remove after the walk");
    alarm(0);
}

/* 100k page-aligned addresses over the 48-bit space: page numbers i * odd mod 2^36 are distinct. */
#define SPREAD 100000ULL
static uint64_t spread(uint64_t i) { return ((i * 0x9E3779B1ULL) & ((1ULL << 36) - 1)) * PAGE; }
/* 20k addresses that agree in their low 20 bits (the 2022 prototype put them in one bucket). */
#define COLLIDE 20000ULL
static uint64_t collide(uint64_t i) { return (i << 20) | 0x5000; }

static uint64_t walked, walked_dirty;
static void mark_dirty(vm_page *p) {
    p->flag_phys_dirty = 1;
    p->access_count += 1000000;
    walked++;
}
static void count_dirty(vm_page *p) {
    walked++;
    if (p->flag_phys_dirty) walked_dirty++;
    p->flag_phys_dirty = 0; /* discarded: lock == 0 */
    p->phys_addr = 0;
}

static void test_many_and_walks(void) {
    for (uint64_t i = 0; i < SPREAD; i++) store(spread(i), i + 1);
    for (uint64_t i = 0; i < COLLIDE; i++) store(collide(i), SPREAD + i + 1);
    CHECK(vm_map_page_count() == SPREAD + COLLIDE, "count %llu", (unsigned long long)vm_map_page_count());
    uint64_t lost = 0;
    for (uint64_t i = 0; i < SPREAD; i++) lost += !holds(spread(i) + 17, i + 1);
    for (uint64_t i = 0; i < COLLIDE; i++) lost += !holds(collide(i), SPREAD + i + 1);
    CHECK(lost == 0, "%llu mappings lost", (unsigned long long)lost);

    walked = 0;
    vm_map_map_do_for_all(mark_dirty, 1);
    CHECK(walked == SPREAD + COLLIDE, "locked walk visited %llu", (unsigned long long)walked);
    vm_page p = get_page(A(spread(42)));
    CHECK(p.flag_phys_dirty == 1 && p.access_count == 43 + 1000000, "locked walk changes not stored");

    walked = walked_dirty = 0;
    vm_map_map_do_for_all(count_dirty, 0);
    CHECK(walked == SPREAD + COLLIDE && walked_dirty == walked, "unlocked walk %llu/%llu",
          (unsigned long long)walked_dirty, (unsigned long long)walked);
    p = get_page(A(spread(42)));
    CHECK(p.flag_phys_dirty == 1 && p.phys_addr == 43 * PAGE, "unlocked walk changes were stored");

    for (uint64_t i = 0; i < COLLIDE; i += 2) CHECK(vm_map_remove_page(A(collide(i))) == 1, "remove %llu", (unsigned long long)i);
    uint64_t wrong = 0;
    for (uint64_t i = 0; i < COLLIDE; i++) {
        vm_page q;
        wrong += vm_map_get_page(A(collide(i)), &q) != (int)(i % 2);
    }
    CHECK(wrong == 0, "%llu colliding pages wrong after removes", (unsigned long long)wrong);
    for (uint64_t i = 1; i < COLLIDE; i += 2) vm_map_remove_page(A(collide(i)));
    for (uint64_t i = 0; i < SPREAD; i++) vm_map_remove_page(A(spread(i)));
    CHECK(vm_map_page_count() == 0, "count %llu after removing all", (unsigned long long)vm_map_page_count());
}

/* Several pthreads set and get at once; each thread owns a range, and all read a shared range. */
#define THREADS 4
#define PER_THREAD 20000ULL
#define SHARED 1000ULL
static uint64_t shared_addr(uint64_t i) { return 0x600000000000ULL + i * PAGE; }
static void *worker(void *arg) {
    uint64_t t = (uint64_t)(uintptr_t)arg, bad = 0;
    for (uint64_t round = 0; round < 3; round++) {
        for (uint64_t i = 0; i < PER_THREAD; i++) {
            uint64_t a = ((t + 1) << 40) + i * PAGE;
            store(a, i + round);
            bad += !holds(a, i + round);
            uint64_t s = (i * 7 + t) % SHARED;
            vm_page q;
            /* Shared pages are always mapped and always hold a value some thread stored. */
            if (vm_map_get_page(A(shared_addr(s)), &q) != 1 || q.curr_page % SHARED != s) bad++;
            if (i % 5 == t) store(shared_addr(s), s + SHARED * (t + 1));
        }
    }
    return (void *)(uintptr_t)bad;
}

static void test_threads(void) {
    for (uint64_t i = 0; i < SHARED; i++) store(shared_addr(i), i);
    pthread_t th[THREADS];
    for (uint64_t t = 0; t < THREADS; t++) CHECK(pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t) == 0, "spawn");
    uint64_t bad = 0;
    for (uint64_t t = 0; t < THREADS; t++) {
        void *r;
        pthread_join(th[t], &r);
        bad += (uint64_t)(uintptr_t)r;
    }
    CHECK(bad == 0, "%llu bad reads across threads", (unsigned long long)bad);
    CHECK(vm_map_page_count() == SHARED + THREADS * PER_THREAD, "count %llu", (unsigned long long)vm_map_page_count());
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "layout") == 0) {
        print_layout();
        return 0;
    }
    test_basics();
    test_reentry();
    test_many_and_walks();
    test_threads();
    printf("c-api: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
