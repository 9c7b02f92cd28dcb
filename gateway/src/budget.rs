//! What one client address may use: token buckets for rates (conversation starts,
//! messages, upload bytes) and slots for things held open (connections, sockets,
//! uploads in progress).
//!
//! Both forget an address once it holds nothing and its bucket is full again, and both
//! track at most [`MAX_TRACKED_ADDRESSES`] addresses, so an attacker with many
//! addresses costs a bounded table too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Addresses tracked at most by one table.
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// The address a budget is kept for: an IPv4 address, or an IPv6 address's /64 (one
/// customer's network gets a /64, so one /128 each would let it through every limit).
pub fn client_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// How many addresses' shares of an open-slot limit one IPv6 /48 holds at most.
pub const NETWORK_SHARES: u32 = 16;

/// The IPv6 /48 that a client address (an IPv6 /64) is in; `None` for IPv4. A
/// subscriber is often given a /56 or a /48, so slots are also counted per /48.
fn network(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 80) - 1)))),
    }
}

/// A token bucket per key (a client address, a conversation): `capacity` tokens that
/// refill in full over `period`.
///
/// A bucket that is full again holds nothing worth keeping, so once a `period` the
/// table forgets those: it holds the keys used in about the last two periods, not every
/// key seen since the last time it filled up (a node's table of conversations grew to
/// [`MAX_TRACKED_ADDRESSES`] entries over a day's traffic before).
pub struct Buckets<K = IpAddr> {
    period: Duration,
    buckets: Mutex<Table<K>>,
}

struct Table<K> {
    buckets: HashMap<K, (f64, Instant)>,
    /// When full buckets were last forgotten.
    swept: Instant,
}

impl<K: std::hash::Hash + Eq> Table<K> {
    /// Forgets the buckets that are full again at `rate` tokens a second, and gives the
    /// table's memory back when most of it is free.
    fn forget_full(&mut self, capacity: f64, rate: f64, now: Instant) {
        self.buckets.retain(|_, (tokens, since)| *tokens + now.duration_since(*since).as_secs_f64() * rate < capacity);
        if self.buckets.capacity() > 64 && self.buckets.len() < self.buckets.capacity() / 4 {
            self.buckets.shrink_to(self.buckets.len() * 2);
        }
        self.swept = now;
    }
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    pub fn new(period: Duration) -> Self {
        Buckets { period, buckets: Mutex::new(Table { buckets: HashMap::new(), swept: Instant::now() }) }
    }

    /// Keys the table holds a bucket for.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).buckets.len()
    }

    /// Takes `cost` tokens from `key`'s bucket if it has them.
    pub fn take(&self, ip: K, cost: f64, capacity: f64) -> bool {
        self.take_at(ip, cost, capacity, Instant::now())
    }

    /// [`Buckets::take`] as of `now` (tests give the time).
    fn take_at(&self, ip: K, cost: f64, capacity: f64, now: Instant) -> bool {
        let capacity = capacity.max(1.0);
        let rate = capacity / self.period.as_secs_f64();
        let mut table = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(table.swept) >= self.period {
            // Once a period: one scan of the table, however many calls came.
            table.forget_full(capacity, rate, now);
        }
        if table.buckets.len() >= MAX_TRACKED_ADDRESSES && !table.buckets.contains_key(&ip) {
            // Forget the buckets that are full again; if that frees nothing, forget
            // them all rather than refuse every new visitor (the other limits still
            // hold). Either way the table is scanned once per MAX_TRACKED_ADDRESSES
            // newcomers at most, not on every call.
            table.forget_full(capacity, rate, now);
            if table.buckets.len() >= MAX_TRACKED_ADDRESSES / 2 {
                tracing::warn!(tracked = table.buckets.len(), "budget table full: forgetting every address's budget");
                table.buckets.clear();
            }
        }
        let (tokens, since) = table.buckets.entry(ip).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*since).as_secs_f64() * rate).min(capacity);
        *since = now;
        if *tokens >= cost {
            *tokens -= cost;
            true
        } else {
            false
        }
    }
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    /// Whether `key`'s bucket holds a whole token now (nothing is taken).
    pub fn has(&self, key: &K, capacity: f64) -> bool {
        let capacity = capacity.max(1.0);
        let rate = capacity / self.period.as_secs_f64();
        let table = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match table.buckets.get(key) {
            Some((tokens, since)) => tokens + since.elapsed().as_secs_f64() * rate >= 1.0,
            None => true,
        }
    }
}

/// Why a slot was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This address holds its share already.
    Address,
    /// The whole table is full.
    Total,
}

/// Counts what each address holds open, with a cap per address (and
/// [`NETWORK_SHARES`] times it per IPv6 /48) and in all.
#[derive(Default)]
pub struct Slots {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_address: HashMap<IpAddr, u32>,
    all: u32,
    /// Slots held per IPv6 /48.
    by_network: HashMap<IpAddr, u32>,
}

impl Slots {
    pub fn new() -> Arc<Self> {
        Arc::new(Slots::default())
    }

    /// A slot for `ip`, given back when the returned guard drops.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, per_address: u32, total: u32) -> Result<Slot, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Held { by_address, all, by_network } = &mut *held;
        if *all >= total {
            return Err(Refused::Total);
        }
        if by_address.len() >= MAX_TRACKED_ADDRESSES && !by_address.contains_key(&ip) {
            return Err(Refused::Total);
        }
        if by_address.get(&ip).copied().unwrap_or(0) >= per_address {
            return Err(Refused::Address);
        }
        if let Some(net) = network(ip) {
            let n = by_network.entry(net).or_insert(0);
            if *n >= per_address.saturating_mul(NETWORK_SHARES) {
                if *n == 0 {
                    by_network.remove(&net);
                }
                return Err(Refused::Address);
            }
            *n += 1;
        }
        *by_address.entry(ip).or_insert(0) += 1;
        *all += 1;
        Ok(Slot { slots: self.clone(), ip })
    }

    /// Slots held in all.
    pub fn held(&self) -> u32 {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).all
    }
}

/// One held slot.
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        let Held { by_address, all, by_network } = &mut *held;
        *all = all.saturating_sub(1);
        if let Some(n) = by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.ip);
            }
        }
        if let Some(net) = network(self.ip) {
            if let Some(n) = by_network.get_mut(&net) {
                *n -= 1;
                if *n == 0 {
                    by_network.remove(&net);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One subscriber's /48 (65,536 /64s) holds at most 16 addresses' shares.
    #[test]
    fn an_ipv6_48_holds_at_most_sixteen_addresses_shares() {
        let slots = Slots::new();
        let in_net = |n: u16| client_address(format!("2001:db8:7:{n:x}::1").parse().unwrap());
        let held: Vec<Slot> = (0..32).map(|n| slots.acquire(in_net(n), 2, 1000).expect("within the /48's share")).collect();
        assert_eq!(slots.acquire(in_net(40), 2, 1000).err(), Some(Refused::Address), "the /48 holds 16 x 2 already");
        let other = client_address("2001:db8:8::1".parse().unwrap());
        assert!(slots.acquire(other, 2, 1000).is_ok(), "another /48 is not held back");
        drop(held);
        assert!(slots.acquire(in_net(40), 2, 1000).is_ok(), "the /48's slots come back on drop");
        assert!(slots.held.lock().unwrap().by_network.len() <= 2);
    }

    #[test]
    fn slots_cap_each_address_and_the_total_and_come_back_on_drop() {
        let slots = Slots::new();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.acquire(a, 2, 3).unwrap();
        let _second = slots.acquire(a, 2, 3).unwrap();
        assert_eq!(slots.acquire(a, 2, 3).err(), Some(Refused::Address));
        let _third = slots.acquire(b, 2, 3).unwrap();
        assert_eq!(slots.acquire(b, 2, 3).err(), Some(Refused::Total));
        drop(first);
        let _again = slots.acquire(a, 2, 3).unwrap();
        assert_eq!(slots.held(), 3);
    }

    #[test]
    fn ipv6_addresses_share_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_address(a), client_address(b));
        assert_ne!(client_address(a), client_address(other));
        assert_eq!(client_address("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn buckets_charge_by_cost_per_address() {
        let buckets = Buckets::new(Duration::from_secs(3600));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(buckets.take(a, 600.0, 1000.0));
        assert!(!buckets.take(a, 600.0, 1000.0), "only 400 left this hour");
        assert!(buckets.take(a, 400.0, 1000.0));
        assert!(buckets.take(b, 1000.0, 1000.0), "another address has its own budget");
    }

    #[test]
    fn buckets_forget_the_keys_whose_budget_is_whole_again_once_a_period() {
        let period = Duration::from_secs(60);
        let buckets = Buckets::new(period);
        let start = Instant::now();
        let at = |periods: f64| start + period.mul_f64(periods);
        for n in 0..1000u32 {
            assert!(buckets.take_at(n, 1.0, 10.0, at(0.0)));
        }
        assert_eq!(buckets.tracked(), 1000);
        assert!(buckets.take_at(7, 9.0, 10.0, at(0.0)));
        assert!(!buckets.take_at(7, 1.0, 10.0, at(0.0)), "key 7 spent its budget");
        // Three periods on, every bucket is whole again: the next call forgets them all
        // but its own.
        assert!(buckets.take_at(5000, 1.0, 10.0, at(3.0)));
        assert_eq!(buckets.tracked(), 1, "buckets kept after they were whole again");
        assert!(buckets.take_at(7, 10.0, 10.0, at(3.0)), "a forgotten key starts with a whole budget");
        // Key 8 spends its budget half a period after that sweep: still counting at the
        // next, so kept, and its spending still holds.
        assert!(buckets.take_at(8, 10.0, 10.0, at(3.5)));
        assert!(buckets.take_at(9, 1.0, 10.0, at(4.2)));
        assert!(!buckets.take_at(8, 8.0, 10.0, at(4.2)), "key 8 has refilled 7 of its 10, not more");
        assert_eq!(buckets.tracked(), 2, "keys 8 and 9");
    }
}

/// A log line said at most once per `every`: [`LogEvery::note`] answers `Some(n)` when
/// the line is due (with `n` occurrences kept quiet since the last one), `None` when it
/// is kept quiet. What an anonymous client can make happen over and over costs a line
/// per period, not one per occurrence.
pub struct LogEvery {
    every: Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogEvery {
    pub const fn new(every: Duration) -> Self {
        LogEvery { every, state: std::sync::Mutex::new((None, 0)) }
    }

    pub fn note(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, quiet) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < self.every) {
            *quiet += 1;
            return None;
        }
        *last = Some(std::time::Instant::now());
        Some(std::mem::take(quiet))
    }
}

#[cfg(test)]
mod log_every {
    #[test]
    fn a_line_is_said_once_per_period_with_the_count_kept_quiet() {
        let line = super::LogEvery::new(std::time::Duration::from_secs(3600));
        assert_eq!(line.note(), Some(0));
        assert_eq!((line.note(), line.note()), (None, None));
        let soon = super::LogEvery::new(std::time::Duration::ZERO);
        assert_eq!((soon.note(), soon.note()), (Some(0), Some(0)));
    }
}
