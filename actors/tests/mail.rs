//! Mail between groups (ADR 0006) over a network that loses, repeats and reorders
//! both letters and answers, with the sender's forwarder restarted from its records
//! (a leader change) at any point: every posted letter is applied exactly once, in the
//! order it was posted, and a confirmation never drops a letter not yet applied.

use proptest::prelude::*;
use switchboard_actors::mail::{Inbox, Letter, Outbox, Receipt};
use switchboard_actors::records::{decode, encode};

const SOURCE: u64 = 3;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

#[derive(Clone, Debug)]
enum Step {
    /// The source decides something for the destination.
    Post,
    /// The forwarder sends every unconfirmed letter.
    Send,
    /// The letter in flight at this position (modulo their number) arrives; with
    /// `keep` a copy stays in flight to arrive again later.
    Deliver { pick: usize, keep: bool },
    /// The letter at this position is lost.
    Lose { pick: usize },
    /// The answer at this position arrives at the source (`keep`: it arrives again).
    Answer { pick: usize, keep: bool },
    /// The answer at this position is lost.
    LoseAnswer { pick: usize },
    /// Both groups change leader: their state is what their records hold.
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Post),
        2 => Just(Step::Send),
        6 => (any::<usize>(), any::<bool>()).prop_map(|(pick, keep)| Step::Deliver { pick, keep }),
        1 => any::<usize>().prop_map(|pick| Step::Lose { pick }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, keep)| Step::Answer { pick, keep }),
        1 => any::<usize>().prop_map(|pick| Step::LoseAnswer { pick }),
        1 => Just(Step::Restart),
    ]
}

struct World {
    outbox: Outbox<u32>,
    inbox: Inbox,
    posted: Vec<u32>,
    applied: Vec<u32>,
    letters: Vec<Letter<u32>>,
    answers: Vec<u64>,
}

impl World {
    fn new() -> Self {
        World { outbox: Outbox::default(), inbox: Inbox::default(), posted: Vec::new(), applied: Vec::new(), letters: Vec::new(), answers: Vec::new() }
    }

    fn send(&mut self) {
        for (id, payload) in self.outbox.unconfirmed() {
            self.letters.push(Letter { from: SOURCE, id, payload: *payload });
        }
    }

    fn arrive(&mut self, letter: Letter<u32>) {
        match self.inbox.receive(letter.from, letter.id) {
            Receipt::Apply => self.applied.push(letter.payload),
            Receipt::Repeat => {}
            Receipt::Early { expected } => assert!(expected < letter.id, "an early letter names a later one as expected"),
        }
        self.answers.push(self.inbox.last(letter.from));
    }

    fn confirm(&mut self, upto: u64) {
        let dropped = self.outbox.confirm(upto);
        assert!(dropped.is_ok(), "an answer confirmed letters never posted: {dropped:?}");
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Post => {
                let payload = self.posted.len() as u32 * 7 + 1;
                self.posted.push(payload);
                let id = self.outbox.post(payload);
                assert_eq!(id, self.posted.len() as u64);
            }
            Step::Send => self.send(),
            Step::Deliver { pick, keep } if !self.letters.is_empty() => {
                let at = pick % self.letters.len();
                let letter = if keep { self.letters[at].clone() } else { self.letters.swap_remove(at) };
                self.arrive(letter);
            }
            Step::Lose { pick } if !self.letters.is_empty() => {
                let at = pick % self.letters.len();
                self.letters.swap_remove(at);
            }
            Step::Answer { pick, keep } if !self.answers.is_empty() => {
                let at = pick % self.answers.len();
                let upto = if keep { self.answers[at] } else { self.answers.swap_remove(at) };
                self.confirm(upto);
            }
            Step::LoseAnswer { pick } if !self.answers.is_empty() => {
                let at = pick % self.answers.len();
                self.answers.swap_remove(at);
            }
            Step::Restart => {
                // A new leader reads the replicated records; what was in flight may
                // still arrive from the old leader's sends.
                self.outbox = decode(&encode(&self.outbox)).expect("the outbox as a record");
                self.inbox = decode(&encode(&self.inbox)).expect("the inbox as a record");
            }
            _ => {}
        }
        self.check();
    }

    fn check(&self) {
        // Applied is always a prefix of posted: nothing twice, nothing out of order.
        assert!(self.applied.len() <= self.posted.len());
        assert_eq!(self.applied[..], self.posted[..self.applied.len()]);
        assert_eq!(self.inbox.last(SOURCE), self.applied.len() as u64);
        // The outbox still holds every letter not yet applied.
        let first_pending = self.outbox.unconfirmed().next().map(|(id, _)| id).unwrap_or(self.outbox.last_posted() + 1);
        assert!(first_pending <= self.applied.len() as u64 + 1, "a letter was dropped before it was applied");
    }

    /// The network heals: the forwarder sends, everything arrives in order, answers too.
    fn drain(&mut self) {
        self.letters.clear();
        self.answers.clear();
        for _ in 0..3 {
            if self.outbox.is_empty() {
                break;
            }
            self.send();
            for letter in std::mem::take(&mut self.letters) {
                self.arrive(letter);
            }
            for upto in std::mem::take(&mut self.answers) {
                self.confirm(upto);
            }
            self.check();
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_letter_is_applied_once_and_in_order(steps in prop::collection::vec(step(), 1..300)) {
        let mut world = World::new();
        for step in steps {
            world.run(step);
        }
        world.drain();
        prop_assert!(world.outbox.is_empty(), "letters still unconfirmed after the network healed");
        prop_assert_eq!(&world.applied, &world.posted);
    }
}
