//! `loadgen fleet`'s options, and the drills it can run: each a deployment strategy, the
//! model file its version is pushed from, the `registry deploy` arguments it sends and the
//! registry event that must end it.

use std::time::Duration;

use anyhow::bail;
use clap::builder::TypedValueParser as _;

use super::{load, MODEL};
use crate::cli::{count, secs, BenchCommon, ServerBin};

/// One drill: a deployment strategy and what the fleet must do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drill {
    /// Blue/green to a new version (the `mlp_small` file again): must switch.
    #[value(name = "blue_green")]
    BlueGreen,
    /// Canary of a new version (the `mlp_small` file again): must be promoted.
    Canary,
    /// Rolling update to a new version (the bigger `mlp` file): must roll out.
    Rolling,
    /// Canary of `mlp_slow` (~10 ms a call): must be rolled back.
    #[value(name = "failing_canary")]
    FailingCanary,
}

impl Drill {
    pub fn strategy(self) -> &'static str {
        match self {
            Drill::BlueGreen => "blue_green",
            Drill::Canary | Drill::FailingCanary => "canary",
            Drill::Rolling => "rolling",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Drill::FailingCanary => "failing_canary",
            other => other.strategy(),
        }
    }

    /// The registry event that ends the drill as it should end.
    pub fn expected_event(self) -> &'static str {
        match self {
            Drill::BlueGreen => "switched",
            Drill::Canary => "promoted",
            Drill::Rolling => "rolled_out",
            Drill::FailingCanary => "rolled_back",
        }
    }

    /// The model file its version is pushed from (relative to `models/`), and why.
    pub fn file(self) -> (&'static str, &'static str) {
        match self {
            Drill::BlueGreen | Drill::Canary => ("mlp_small/1/model.onnx", "the mlp_small file"),
            Drill::Rolling => ("mlp/1/model.onnx", "the bigger mlp file"),
            Drill::FailingCanary => ("mlp_slow/1/model.onnx", "mlp_slow, ~10 ms a call"),
        }
    }
}

/// `loadgen fleet`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct FleetOptions {
    /// The drills, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "blue_green,canary,rolling,failing_canary"
    )]
    pub drills: Vec<Drill>,
    /// `streamserve serve` instances behind haproxy.
    #[arg(long, default_value_t = 3, value_parser = count(2, 8))]
    pub instances: usize,
    /// Requests per second through haproxy, in all.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Client tasks, each paced at rate ÷ concurrency.
    #[arg(long, default_value_t = 8, value_parser = count(1, 64))]
    pub concurrency: usize,
    /// The instances' `--registry-poll-secs`.
    #[arg(long, default_value_t = 0.5)]
    pub poll_secs: f64,
    /// Canary steps in percent (both canaries).
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 50, 100])]
    pub canary_steps: Vec<u32>,
    /// Seconds per canary step.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub step_secs: u64,
    /// Rolling: seconds each instance holds healthy before the next switches.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub hold_secs: u64,
    /// Seconds of steady load on a converged fleet before each deploy and after each outcome.
    #[arg(long = "settle-secs", value_name = "SETTLE_SECS", default_value = "2", value_parser = secs(1, 60))]
    pub settle: Duration,
    /// Longest wait for one drill's outcome and for the fleet to settle on it.
    #[arg(long = "step-timeout-secs", value_name = "STEP_TIMEOUT_SECS", default_value = "90", value_parser = secs(10, 600))]
    pub step_timeout: Duration,
    /// Width of the traffic-share bins, ms.
    #[arg(long = "bin-ms", value_name = "BIN_MS", default_value = "250",
          value_parser = clap::value_parser!(u64).range(50..=5000).map(Duration::from_millis))]
    pub bin: Duration,
    /// haproxy's health check interval, ms.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(100..=10_000))]
    pub check_ms: u64,
    #[command(flatten)]
    pub server: ServerBin,
    #[command(flatten)]
    pub common: BenchCommon,
}

impl Default for FleetOptions {
    fn default() -> Self {
        crate::cli::defaults()
    }
}

impl FleetOptions {
    pub fn check(&self) -> anyhow::Result<()> {
        if self.drills.is_empty() {
            bail!("no drill to run");
        }
        if !(self.rate.is_finite() && self.rate >= 1.0 && self.rate <= load::MAX_RATE) {
            bail!("rate must be 1 to {} requests/s", load::MAX_RATE);
        }
        if !(0.1..=10.0).contains(&self.poll_secs) {
            bail!("poll-secs must be 0.1 to 10");
        }
        let steps = &self.canary_steps;
        if steps.is_empty()
            || steps.last() != Some(&100)
            || steps.windows(2).any(|w| w[0] >= w[1])
            || steps[0] == 0
        {
            bail!("canary steps must be increasing percentages ending at 100, got {steps:?}");
        }
        Ok(())
    }

    /// `registry deploy` arguments of `drill` to `version`.
    pub fn deploy_args(&self, drill: Drill, version: &str) -> Vec<String> {
        let mut args: Vec<String> = ["deploy", MODEL, version, "--strategy", drill.strategy()]
            .map(String::from)
            .into();
        match drill {
            Drill::Canary | Drill::FailingCanary => {
                let steps: Vec<String> = self.canary_steps.iter().map(u32::to_string).collect();
                args.extend(["--steps".into(), steps.join(",")]);
                args.extend(["--step-secs".into(), self.step_secs.to_string()]);
            }
            Drill::Rolling => args.extend(["--hold-secs".into(), self.hold_secs.to_string()]),
            Drill::BlueGreen => {}
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_four_drills_and_pass_the_checks() {
        let o = FleetOptions::default();
        o.check().unwrap();
        assert_eq!(
            o.drills,
            [
                Drill::BlueGreen,
                Drill::Canary,
                Drill::Rolling,
                Drill::FailingCanary
            ]
        );
        assert_eq!(
            o.deploy_args(Drill::Canary, "3").join(" "),
            "deploy mlp 3 --strategy canary --steps 10,50,100 --step-secs 4"
        );
        assert_eq!(
            o.deploy_args(Drill::Rolling, "4").join(" "),
            "deploy mlp 4 --strategy rolling --hold-secs 3"
        );
        assert_eq!(
            o.deploy_args(Drill::BlueGreen, "2").join(" "),
            "deploy mlp 2 --strategy blue_green"
        );
        assert_eq!(Drill::FailingCanary.expected_event(), "rolled_back");
        assert_eq!(Drill::FailingCanary.strategy(), "canary");
        for drill in o.drills {
            let file = crate::fleet::procs::repo()
                .join("models")
                .join(drill.file().0);
            assert!(file.is_file(), "{}", file.display());
        }
    }

    #[test]
    fn the_scenario_file_gives_these_options() {
        let o: FleetOptions = crate::scenario::bundled_options("fleet-mlp.toml", "fleet");
        o.check().unwrap();
        assert_eq!(o.drills.len(), 4);
        assert_eq!((o.instances, o.concurrency, o.poll_secs), (3, 8, 0.5));
    }

    #[test]
    fn bad_options_are_refused() {
        let bad: [fn(&mut FleetOptions); 5] = [
            |o| o.drills.clear(),
            |o| o.rate = 0.0,
            |o| o.poll_secs = 0.0,
            |o| o.canary_steps = vec![10, 50],
            |o| o.canary_steps = vec![50, 10, 100],
        ];
        for change in bad {
            let mut o = FleetOptions::default();
            change(&mut o);
            assert!(o.check().is_err(), "{o:?} was accepted");
        }
    }
}
