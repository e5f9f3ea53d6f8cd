//! Reader of the committed known-answer file `testdata/kat.txt` (format
//! described in its header), shared by the integration tests.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use microcert_core::{DeviceId, Header, KeySeed, SEED_LEN, Suite};

/// The committed known-answer vectors.
pub const KAT: &str = include_str!("../../testdata/kat.txt");

/// One record: `NAME = value` lines in file order.
#[derive(Debug, Clone)]
pub struct Record {
    pub fields: Vec<(String, String)>,
}

impl Record {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn str(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("record {} has no {name}", self.count()))
    }

    pub fn count(&self) -> &str {
        self.get("COUNT").unwrap_or("?")
    }

    pub fn ty(&self) -> &str {
        self.str("TYPE")
    }

    pub fn hex(&self, name: &str) -> Vec<u8> {
        hex::decode(self.str(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    pub fn array<const N: usize>(&self, name: &str) -> [u8; N] {
        self.hex(name)
            .try_into()
            .unwrap_or_else(|_| panic!("{name} is not {N} bytes"))
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.str(name).parse().expect(name)
    }

    pub fn u64_hex(&self, name: &str) -> u64 {
        u64::from_str_radix(self.str(name), 16).expect(name)
    }

    /// The header fields of a message record.
    pub fn header(&self) -> Header {
        Header {
            suite: Suite::new(self.num("SUITE")).unwrap(),
            device: DeviceId(self.array("DEVICE")),
            generation: self.num("GENERATION"),
            t: self.num("TIME"),
            r: self.u64_hex("NONCE"),
        }
    }
}

/// The whole file: the global lines before the first record, and records.
pub struct Kat {
    pub globals: Record,
    pub records: Vec<Record>,
}

impl Kat {
    pub fn parse(text: &str) -> Kat {
        let mut globals = Record { fields: Vec::new() };
        let mut records = Vec::new();
        let mut cur: Option<Record> = None;
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.trim().is_empty() {
                records.extend(cur.take());
                continue;
            }
            let (name, value) = line
                .split_once(" = ")
                .unwrap_or_else(|| panic!("not a NAME = value line: {line}"));
            let field = (name.to_owned(), value.to_owned());
            match (&mut cur, name) {
                (Some(r), _) => r.fields.push(field),
                (None, "COUNT") => {
                    cur = Some(Record {
                        fields: vec![field],
                    })
                }
                (None, _) => globals.fields.push(field),
            }
        }
        records.extend(cur);
        Kat { globals, records }
    }

    pub fn load() -> Kat {
        Kat::parse(KAT)
    }

    pub fn seed(&self) -> KeySeed {
        let bytes: [u8; SEED_LEN] = self.globals.array("SEED");
        KeySeed::from_bytes(&bytes, self.globals.num("BASE_YEAR"))
    }

    pub fn of_type<'a>(&'a self, ty: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.iter().filter(move |r| r.ty() == ty)
    }

    /// The MESSAGE of the first record of type `ty` in `suite`.
    pub fn message(&self, ty: &str, suite: u8) -> Vec<u8> {
        self.of_type(ty)
            .find(|r| r.get("SUITE") == Some(&suite.to_string()))
            .unwrap_or_else(|| panic!("no {ty} vector in suite {suite}"))
            .hex("MESSAGE")
    }
}
