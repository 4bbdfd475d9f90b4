//! The peer layer's tunables (sessions, the service's dialers and joins, `peer join`), in one place (like [`crate::runtime::Limits`] for app code).

use std::time::Duration;

/// How much a replication session sends at once, keeps in memory, and waits; and how long a
/// connection may stay silent. [`Limits::default`] is what a node runs with;
/// [`Limits::from_env`] applies the overrides tests use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Changes per group (a group never splits an origin transaction, so it may hold more).
    pub group_changes: usize,
    /// A Changes message is cut after about this many bytes.
    pub message_bytes: usize,
    /// Offered content kept in memory for serving, at most this many bytes per session.
    pub keep_offered_bytes: usize,
    /// A piece of a group ends after this much referenced content.
    pub piece_content_bytes: usize,
    /// Groups sent ahead of the peer's acknowledgements.
    pub window: u64,
    /// Fetched content is kept in `peer_content` in batches of about this many bytes...
    pub stage_bytes: usize,
    /// ... once a group's content has been arriving for this long. A faster transfer is
    /// applied straight from memory: writing it twice would slow it more than fetching it
    /// again after a cut would cost. `FAZT_STAGE_AFTER_MS` overrides it (tests cut transfers
    /// on loopback).
    pub stage_after: Duration,
    /// Digests per Want message.
    pub want_batch: usize,
    /// A session reads content it no longer keeps in memory on a connection of its own,
    /// opened on the first Want that needs one and closed after this long without a Want.
    pub content_idle: Duration,
    /// A session's exporter keeps its connection between passes for this long without a
    /// pass, then closes it (about 1 MB of SQLite's parsed schema and caches each) and opens
    /// one again for the next pass.
    pub export_idle: Duration,
    /// How long a connection (or a handshake) may go without hearing from the peer before it
    /// is declared dead: five missed keep-alives (see [`Limits::keep_alive`]). Short, because
    /// a peer restarted after kill -9 cannot close its old connections, and the dialer waits
    /// for them to die before redialing. `FAZT_PEER_IDLE_TIMEOUT_MS` overrides it (tests
    /// shorten it; at least 50 ms).
    pub idle_timeout: Duration,

    /// How long a connection attempt may take before the peer counts as unreachable.
    pub connect_timeout: Duration,
    /// First wait before redialing a peer; it doubles up to `redial_max`.
    pub redial_min: Duration,
    pub redial_max: Duration,
    /// A session that lasted this long resets the redial wait to `redial_min`.
    pub healthy_session: Duration,
    /// How often a session's lag is written to the peers table.
    pub state_interval: Duration,

    /// The most a joiner may send as its first message: a Join holds a 32-byte secret, a
    /// name and an address, far below this.
    pub join_frame: usize,
    /// How long a joiner has, once its handshake is done, to open a stream and send Join.
    pub join_timeout: Duration,
    /// How many joins from unknown keys are served at once; more are closed at once.
    pub max_joiners: usize,
    /// How often `peer join` tries again when the inviting node refused its key in the
    /// handshake (its trust set may not hold an invitation made a moment ago yet), and how
    /// long it waits between tries.
    pub join_attempts: u32,
    pub join_retry: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            group_changes: 2_000,
            message_bytes: 256 * 1024,
            keep_offered_bytes: 64 << 20,
            piece_content_bytes: 4 << 20,
            window: 4,
            stage_bytes: 16 << 20,
            stage_after: Duration::from_secs(1),
            want_batch: 1_000,
            content_idle: Duration::from_secs(5),
            export_idle: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            redial_min: Duration::from_millis(250),
            redial_max: Duration::from_secs(10),
            healthy_session: Duration::from_secs(10),
            state_interval: Duration::from_secs(1),
            join_frame: 4 << 10,
            join_timeout: Duration::from_secs(5),
            max_joiners: 8,
            join_attempts: 4,
            join_retry: Duration::from_millis(300),
        }
    }
}

impl Limits {
    /// The defaults, with the environment's overrides (`FAZT_STAGE_AFTER_MS`,
    /// `FAZT_PEER_IDLE_TIMEOUT_MS`; a value that does not parse is ignored).
    pub fn from_env() -> Limits {
        Limits::with_overrides(|name| std::env::var(name).ok())
    }

    /// The defaults, with the overrides `var` finds (by environment variable name).
    fn with_overrides(var: impl Fn(&str) -> Option<String>) -> Limits {
        let ms = |name: &str| var(name).and_then(|v| v.parse::<u64>().ok());
        let mut limits = Limits::default();
        if let Some(after) = ms("FAZT_STAGE_AFTER_MS") {
            limits.stage_after = Duration::from_millis(after);
        }
        if let Some(idle) = ms("FAZT_PEER_IDLE_TIMEOUT_MS")
            .filter(|&idle| (50..=u64::from(u32::MAX)).contains(&idle))
        {
            limits.idle_timeout = Duration::from_millis(idle);
        }
        limits
    }

    /// The keep-alive interval that follows from the idle timeout: an idle connection sends
    /// a keep-alive every fifth of it (2 s by default), so NATs keep their mapping and the
    /// timeout only fires for a peer that is really gone.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_millis(u64::from(self.idle_timeout_ms()) / 5)
    }

    /// The idle timeout in whole milliseconds, as QUIC's transport parameter carries it.
    pub fn idle_timeout_ms(&self) -> u32 {
        u32::try_from(self.idle_timeout.as_millis()).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_is_a_fifth_of_the_idle_timeout_in_whole_milliseconds() {
        let limits = Limits::default();
        assert_eq!(limits.idle_timeout_ms(), 10_000);
        assert_eq!(limits.keep_alive(), Duration::from_secs(2));
        let short = Limits {
            idle_timeout: Duration::from_millis(52),
            ..Limits::default()
        };
        assert_eq!(short.keep_alive(), Duration::from_millis(10));
    }

    #[test]
    fn the_environment_overrides_staging_and_the_idle_timeout_when_it_makes_sense() {
        let with = |vars: &'static [(&'static str, &'static str)]| {
            Limits::with_overrides(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert_eq!(with(&[]), Limits::default());
        let set = with(&[
            ("FAZT_STAGE_AFTER_MS", "0"),
            ("FAZT_PEER_IDLE_TIMEOUT_MS", "500"),
        ]);
        assert_eq!(set.stage_after, Duration::ZERO);
        assert_eq!(set.idle_timeout, Duration::from_millis(500));
        assert_eq!(set.keep_alive(), Duration::from_millis(100));
        // Too short an idle timeout, or text that is not a number, leaves the default.
        for idle in ["49", "soon", "-5", "99999999999"] {
            let limits = Limits::with_overrides(|name| {
                (name == "FAZT_PEER_IDLE_TIMEOUT_MS").then(|| idle.to_string())
            });
            assert_eq!(limits, Limits::default(), "{idle}");
        }
    }
}
