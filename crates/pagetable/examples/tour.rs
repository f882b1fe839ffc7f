//! The page table as a kernel uses it: map a process-like address space, read it from two
//! threads while a writer changes it, walk it the three ways, and print what happened.
//!
//! `cargo run --release -p pagesnap-pagetable --example tour`

use pagesnap_pagetable::{
    PageFlags, PageTable, PhysAddr, PrototypeModulo, SpinLock, VirtAddr, WalkLock,
    PAGE_DESCRIPTOR_BYTES,
};
use std::time::Instant;

fn main() {
    let table = PageTable::new();
    // A process: 256 MiB of heap, 64 MiB of mmap'd files high up, 8 MiB of stack at the top of the
    // 47-bit user space, and 4096 sparse pages spread over the whole 64-bit space.
    let mut addrs: Vec<u64> = Vec::new();
    addrs.extend((0..65_536u64).map(|i| 0x5555_5555_0000 + i * 4096));
    addrs.extend((0..16_384u64).map(|i| 0x7f3a_0000_0000 + i * 4096));
    addrs.extend((0..2_048u64).map(|i| 0x7fff_ffff_f000 - i * 4096));
    addrs.extend((0..4_096u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & !0xfff));
    let t0 = Instant::now();
    for (i, &a) in addrs.iter().enumerate() {
        let mut p = table.page_init(VirtAddr(a));
        p.paddr = PhysAddr(i as u64 * 4096);
        p.flags = PageFlags::PHYS_MEM;
        if let Err(e) = table.set_page(p) {
            eprintln!("tour: {e}");
            std::process::exit(2);
        }
    }
    let mapped = t0.elapsed();
    println!(
        "mapped {} pages in {:.1} ms",
        table.len(),
        mapped.as_secs_f64() * 1e3
    );

    // Two readers and a writer at once: readers never wait.
    let t0 = Instant::now();
    let found = std::thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    addrs
                        .iter()
                        .filter(|&&a| table.get_page(VirtAddr(a + 123)).is_some())
                        .count()
                })
            })
            .collect();
        s.spawn(|| {
            for &a in addrs.iter().step_by(7) {
                table.update(VirtAddr(a), |p| p.access_count += 1);
            }
        });
        readers
            .into_iter()
            .map(|r| r.join().unwrap_or(0))
            .sum::<usize>()
    });
    let read = t0.elapsed();
    println!(
        "2 readers found {found} of {} lookups ({:.1} M lookups/s) while a writer updated every 7th page",
        2 * addrs.len(),
        2.0 * addrs.len() as f64 / read.as_secs_f64() / 1e6
    );

    let dirty = table.for_each(WalkLock::Map, |p| {
        if p.access_count > 0 {
            p.flags |= PageFlags::PHYS_DIRTY;
        }
    });
    let mut dirty_pages = 0;
    table.for_each(WalkLock::None, |p| {
        dirty_pages += usize::from(p.flags.contains(PageFlags::PHYS_DIRTY))
    });
    println!("walked {dirty} pages with writers held off; {dirty_pages} are now dirty");

    let s = table.stats();
    println!(
        "memory: {:.1} bytes per mapping ({} byte descriptors), {} buckets, {} overflow buckets",
        s.bytes_per_mapping(),
        PAGE_DESCRIPTOR_BYTES,
        s.buckets,
        s.overflow_buckets
    );

    // Four writers at once (more threads than this machine may have cores): with a lock that
    // spins without bound, a writer preempted while holding it makes the others spin away their
    // time slices; the default lock in std builds spins briefly, then parks.
    let contended: PageTable = PageTable::new();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let table = &contended;
            s.spawn(move || {
                for i in 0..200_000u64 {
                    let a = VirtAddr(((t + 1) << 40) + (i / 2 % 4096) * 4096);
                    if i % 2 == 0 {
                        let _ = table.set_page(table.page_init(a));
                    } else {
                        table.remove(a);
                    }
                }
            });
        }
    });
    let wrote = t0.elapsed();
    println!(
        "4 writer threads: 800000 set/remove in {:.1} ms ({:.2} M writes/s)",
        wrote.as_secs_f64() * 1e3,
        0.8 / wrote.as_secs_f64()
    );

    // The 2022 prototype's hash puts all page-aligned addresses into 256 buckets. Nothing is lost
    // here: the full buckets grow overflow chains.
    let proto: PageTable<PrototypeModulo, SpinLock> = PageTable::with_config(Default::default(), 0);
    for &a in &addrs[..20_000] {
        let _ = proto.set_page(proto.page_init(VirtAddr(a)));
    }
    let kept = addrs[..20_000]
        .iter()
        .filter(|&&a| proto.get_page(VirtAddr(a)).is_some())
        .count();
    println!(
        "with the prototype's hash: {kept} of 20000 mappings kept, in {} overflow buckets",
        proto.stats().overflow_buckets
    );
}
