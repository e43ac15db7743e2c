//! JSON lines on a writer (stdout): one object per record, nothing else.
//! The summary is not a record of the contract, so it is not written here;
//! the `detached` record closes the stream.

use std::io::{self, Write};

use super::{Record, Sink, Summary};

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn emit(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    fn end_tick(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, _summary: &Summary) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_per_line() {
        let mut sink = JsonSink::new(Vec::new());
        sink.emit(&Record::TargetExit { ts: 1.0, pid: 3 }).unwrap();
        sink.emit(&Record::TargetExit { ts: 2.0, pid: 4 }).unwrap();
        sink.end_tick().unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["type"], "target_exit");
        assert_eq!(lines[1]["pid"], 4);
    }
}
