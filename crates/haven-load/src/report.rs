//! Results: latency percentiles (HDR histogram), CPU and memory read from
//! /proc, and the output (one JSON line on stdout, a summary on stderr).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Clock ticks per second of /proc/PID/stat times (`getconf CLK_TCK`; 100
/// on every Linux this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// The process-wide time origin: send times travel in `client_id`s as
/// microseconds since it, so the receiving task can compute the latency.
pub fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Microseconds from [`origin`] to `at`.
pub fn micros_since_origin(at: Instant) -> u64 {
    at.saturating_duration_since(origin()).as_micros() as u64
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// Percentiles of latencies given in microseconds.
    pub fn of_micros<'a>(samples: impl IntoIterator<Item = &'a [u32]>) -> Self {
        // 1 µs to 10 min, 3 significant digits.
        let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3) else {
            return Self::default();
        };
        for chunk in samples {
            for &micros in chunk {
                histogram.saturating_record(u64::from(micros.max(1)));
            }
        }
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }
}

/// A latency in microseconds, saturating.
pub fn micros(duration: Duration) -> u32 {
    duration.as_micros().min(u128::from(u32::MAX)) as u32
}

/// The resident memory of a process, in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of a process (all threads), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy and total ticks of the whole machine, from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|value| value.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// A snapshot of CPU counters, to measure a window.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    at: Instant,
    server: Option<u64>,
    own: Option<u64>,
    machine: Option<(u64, u64)>,
}

/// Where the machine's CPU went during a window, in cores (1.0 = one core
/// fully busy).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CpuSplit {
    pub window_s: f64,
    /// The server (or relay) process, when its pid was given.
    pub server_cores: Option<f64>,
    /// This load generator.
    pub loadgen_cores: f64,
    /// Everything else on the machine: other builds, the mock provider…
    /// A large value marks the run as noisy.
    pub other_cores: Option<f64>,
    /// The whole machine.
    pub machine_busy_cores: Option<f64>,
}

impl Usage {
    pub fn now(server_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server: server_pid.and_then(|pid| cpu_ticks(&pid.to_string())),
            own: cpu_ticks("self"),
            machine: machine_ticks(),
        }
    }

    /// The split between `self` (earlier) and `later`.
    pub fn split(&self, later: &Usage) -> CpuSplit {
        let window = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let cores = |before: Option<u64>, after: Option<u64>| {
            Some(after?.saturating_sub(before?) as f64 / TICKS_PER_SECOND / window)
        };
        let server = cores(self.server, later.server);
        let own = cores(self.own, later.own).unwrap_or(0.0);
        // Ticks of all CPUs together: busy ticks per second are busy cores.
        let machine = match (self.machine, later.machine) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                Some(busy1.saturating_sub(busy0) as f64 / TICKS_PER_SECOND / window)
            }
            _ => None,
        };
        let other = machine.map(|busy| (busy - own - server.unwrap_or(0.0)).max(0.0));
        CpuSplit {
            window_s: window,
            server_cores: server,
            loadgen_cores: own,
            other_cores: other,
            machine_busy_cores: machine,
        }
    }
}

impl CpuSplit {
    pub fn line(&self) -> String {
        let show = |value: Option<f64>| value.map_or("?".to_owned(), |value| format!("{value:.2}"));
        format!(
            "CPU over {:.1} s, in cores: server {}, load generator {:.2}, other {}",
            self.window_s,
            show(self.server_cores),
            self.loadgen_cores,
            show(self.other_cores)
        )
    }
}

/// Prints the result: the summary on stderr, then one JSON line on stdout.
pub fn emit(result: Value, summary: &str) {
    eprintln!("{summary}");
    println!("{result}");
}

/// Progress on stderr.
pub fn progress(text: impl AsRef<str>) {
    eprintln!("[{:7.1} s] {}", origin().elapsed().as_secs_f64(), text.as_ref());
}

/// Rounds to 3 decimals for the JSON result.
pub fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_samples() {
        let samples: Vec<u32> = (1..=1000).map(|n| n * 1000).collect();
        let percentiles = Percentiles::of_micros([samples.as_slice()]);
        assert_eq!(percentiles.count, 1000);
        assert!((percentiles.p50 - 500.0).abs() < 1.0, "{percentiles:?}");
        assert!((percentiles.p99 - 990.0).abs() < 2.0, "{percentiles:?}");
        assert!((percentiles.max - 1000.0).abs() < 1.0, "{percentiles:?}");
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_ticks("self").is_some());
        assert!(rss_kib(std::process::id()).is_some());
        assert!(machine_ticks().is_some());
    }
}
