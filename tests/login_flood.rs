//! Password guessing on one account from many connections and addresses at
//! once: the balancer serves the attempts on an account one after another
//! with a growing delay between them, refuses at once those that would wait
//! too long, and so checks only a handful of guesses in twenty seconds.

mod util;

use lbft::proto::Reply;
use serde_json::json;
use std::time::{Duration, Instant};
use util::*;

const CONNECTIONS: usize = 100;
const ATTACK: Duration = Duration::from_secs(20);
const INVALID: &str = "invalid user or password";

/// Answers one attacker connection got.
#[derive(Default)]
struct Tally {
    invalid: u64,
    /// Every other answer, by its code.
    refused: std::collections::BTreeMap<String, u64>,
}

#[test]
fn a_hundred_connections_guessing_one_password_get_few_answers() {
    let cluster = Cluster::start(1, &[], &["--users"]);
    let state = cluster.dir.path().join("balancer.db");
    let add = user_cmd(&state, &["add", "alice"], Some("correct horse"));
    assert!(add.status.success(), "{add:?}");

    let addr = cluster.balancer.addr;
    let deadline = Instant::now() + ATTACK;
    let attackers: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            std::thread::spawn(move || {
                // From ten addresses, as an attacker rotating them would.
                let mut raw = Raw::connect_from(addr, [127, 0, 0, 1 + (i % 10) as u8]);
                let mut tally = Tally::default();
                let mut guess = 0u64;
                while Instant::now() < deadline {
                    guess += 1;
                    raw.send_json(&json!({
                        "type": "login", "id": guess, "user": "alice",
                        "password": format!("guess {i}-{guess}")
                    }));
                    match raw.reply() {
                        Reply::Error(e) if e.message == INVALID => tally.invalid += 1,
                        Reply::Error(e) => {
                            *tally.refused.entry(e.code.to_string()).or_default() += 1
                        }
                        other => panic!("a guess got {other:?}"),
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for attacker in attackers {
        let tally = attacker.join().unwrap();
        total.invalid += tally.invalid;
        for (code, n) in tally.refused {
            *total.refused.entry(code).or_default() += n;
        }
    }
    println!(
        "{CONNECTIONS} connections guessing for {ATTACK:?}: {} `{INVALID}` answers, refused: {:?}",
        total.invalid, total.refused
    );
    assert!(
        total.invalid <= 30,
        "{} guesses were checked: {:?}",
        total.invalid,
        total.refused
    );
}
