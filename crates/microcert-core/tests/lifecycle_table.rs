//! The full (state, event) table of the life-cycle transition function,
//! written out from ARCHITECTURE.md: every one of the 36 pairs has its
//! expected result here, so a change to any cell fails.

use microcert_core::{Error, Event, KeyState, transition};

use Event::{Activate, Deactivate, Destroy, Resume, Revoke, Suspend};
use KeyState::{Active, Compromised, Deactivated, Destroyed, PreActivation, Suspended};

/// `None` marks an illegal transition.
const TABLE: [(KeyState, [Option<KeyState>; 6]); 6] = [
    // state          Activate      Suspend          Resume        Deactivate         Revoke             Destroy
    (
        PreActivation,
        [Some(Active), None, None, None, Some(Compromised), None],
    ),
    (
        Active,
        [
            None,
            Some(Suspended),
            None,
            Some(Deactivated),
            Some(Compromised),
            None,
        ],
    ),
    (
        Suspended,
        [None, None, Some(Active), None, Some(Compromised), None],
    ),
    (
        Deactivated,
        [None, None, None, None, Some(Compromised), Some(Destroyed)],
    ),
    (Compromised, [None, None, None, None, None, Some(Destroyed)]),
    (Destroyed, [None, None, None, None, None, None]),
];
const EVENTS: [Event; 6] = [Activate, Suspend, Resume, Deactivate, Revoke, Destroy];

#[test]
fn every_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for (from, row) in TABLE {
        for (event, expected) in EVENTS.into_iter().zip(row) {
            let got = transition(from, event);
            match expected {
                Some(to) => assert_eq!(got, Ok(to), "{from} --{event}-->"),
                None => assert_eq!(
                    got,
                    Err(Error::IllegalTransition { from, event }),
                    "{from} --{event}--> must be refused"
                ),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}

#[test]
fn the_table_covers_every_state_and_event() {
    let states: Vec<_> = TABLE.iter().map(|(s, _)| *s).collect();
    assert_eq!(states, KeyState::ALL);
    assert_eq!(EVENTS, Event::ALL);
}

#[test]
fn ten_pairs_are_legal() {
    let legal = TABLE
        .iter()
        .flat_map(|(_, row)| row.iter())
        .filter(|c| c.is_some())
        .count();
    assert_eq!(legal, 10);
}

#[test]
fn destroyed_is_terminal_and_no_event_is_a_no_op() {
    for event in Event::ALL {
        assert!(transition(Destroyed, event).is_err());
        for from in KeyState::ALL {
            assert_ne!(
                transition(from, event),
                Ok(from),
                "{from} --{event}--> is a no-op"
            );
        }
    }
}

#[test]
fn state_names_round_trip() {
    for s in KeyState::ALL {
        assert_eq!(KeyState::from_name(s.name()), Some(s));
    }
    assert_eq!(KeyState::from_name("Active"), None);
    let names: Vec<_> = KeyState::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        [
            "pre-activation",
            "active",
            "suspended",
            "deactivated",
            "compromised",
            "destroyed"
        ]
    );
}
