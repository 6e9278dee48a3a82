// A thread's wake-up when another hands it work over a channel (a futex underneath), on this
// machine: how long from the send until the woken thread runs, and whether it ran on the
// sender's CPU. Build: rustc -O wake.rs; run as is, then under `taskset -c 0`.
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The CPU this thread last ran on (field 39 of /proc/thread-self/stat).
fn cpu() -> u32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    after_comm.split(' ').nth(36).unwrap().parse().unwrap()
}

fn main() {
    let (tx, rx) = mpsc::sync_channel::<Instant>(1);
    let (btx, brx) = mpsc::sync_channel::<(Duration, u32)>(1);
    std::thread::spawn(move || {
        while let Ok(t) = rx.recv() {
            let woke = t.elapsed();
            let _ = btx.send((woke, cpu()));
        }
    });
    let report = |what: &str, mut v: Vec<(Duration, bool)>| {
        let same = v.iter().filter(|x| x.1).count() as f64 / v.len() as f64;
        v.sort();
        println!(
            "{what}: wake p50 {:?} p90 {:?}, woken on the sender's CPU {:.0}%",
            v[v.len() / 2].0,
            v[v.len() * 9 / 10].0,
            100.0 * same
        );
    };
    for gap_us in [0u64, 50, 300, 1000] {
        let mut v = Vec::new();
        for _ in 0..3000 {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(gap_us) {
                std::hint::spin_loop();
            }
            let mine = cpu();
            tx.send(Instant::now()).unwrap();
            let (woke, theirs) = brx.recv().unwrap();
            v.push((woke, mine == theirs));
        }
        report(&format!("sender busy {gap_us:>4} us between sends"), v);
    }
    for gap_us in [300u64, 1000] {
        let mut v = Vec::new();
        for _ in 0..2000 {
            std::thread::sleep(Duration::from_micros(gap_us));
            let mine = cpu();
            tx.send(Instant::now()).unwrap();
            let (woke, theirs) = brx.recv().unwrap();
            v.push((woke, mine == theirs));
        }
        report(&format!("sender asleep {gap_us:>4} us between sends"), v);
    }
}
