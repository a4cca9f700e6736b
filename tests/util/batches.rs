//! Clients sending batches of documents of unique content through a list
//! of balancers (`client --balancer A,B`), one balancer killed on the way,
//! and what landed in the server folders, by content.

use super::{client_bin, stored_files};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The content of client `c`'s document `i`.
pub fn content(c: usize, i: usize) -> String {
    format!("client {c} document {i} aaa")
}

/// The title of client `c`'s document `i`.
pub fn title(c: usize, i: usize) -> String {
    format!("c{c} d{i}")
}

/// Writes `count` documents of unique content for client `c`; their paths.
pub fn documents(dir: &Path, c: usize, count: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    (0..count)
        .map(|i| {
            let path = dir.join(format!("d{i:04}.json"));
            let doc = json!({"titolo": title(c, i), "contenuto": content(c, i)});
            std::fs::write(&path, doc.to_string()).unwrap();
            path.display().to_string()
        })
        .collect()
}

/// Stored documents below the server folders (not `.duplicates/`), by
/// content.
pub fn stored_by_content(dirs: &[PathBuf]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for dir in dirs {
        for (name, v) in stored_files(dir) {
            let content = v["contenuto"].as_str().unwrap_or_default().to_string();
            out.entry(content).or_default().push(name);
        }
    }
    out
}

/// Runs `clients` clients, each sending `count` documents through
/// `balancers` (a list), in `work`; `kill` runs once a client has a tenth
/// of its documents answered. Every client must end with all stored and
/// none failed. Their output lines, by client.
pub fn send_through_a_kill(
    work: &Path,
    balancers: &str,
    clients: usize,
    count: usize,
    kill: impl FnOnce(),
) -> Vec<Vec<String>> {
    let (lines_tx, lines) = mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for c in 0..clients {
        let paths = documents(&work.join(format!("docs{c}")), c, count);
        let mut child = Command::new(client_bin())
            .args(["--balancer", balancers, "--window", "8", "send"])
            .args(&paths)
            .current_dir(work)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let tx = lines_tx.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((c, line));
            }
        });
        children.push((child, reader));
    }
    drop(lines_tx);
    let mut output: Vec<Vec<String>> = vec![Vec::new(); clients];
    let mut kill = Some(kill);
    while let Ok((c, line)) = lines.recv_timeout(Duration::from_secs(120)) {
        if line.contains(&format!("/{count} (")) {
            if let Some(kill) = kill.take() {
                kill();
            }
        }
        output[c].push(line);
    }
    assert!(kill.is_none(), "no client made progress: {output:?}");
    for (mut child, reader) in children {
        assert!(child.wait().unwrap().success());
        reader.join().unwrap();
    }
    for (c, lines) in output.iter().enumerate() {
        let summary = lines.last().unwrap();
        assert!(
            summary.starts_with(&format!("{count} documents: {count} stored, 0 failed")),
            "client {c}: {lines:?}"
        );
    }
    output
}

/// How many clients said they went on through another balancer.
pub fn failed_over(output: &[Vec<String>]) -> usize {
    output
        .iter()
        .filter(|o| o.iter().any(|l| l.contains("going on through")))
        .count()
}

/// Checks that every document of every client is stored exactly once in
/// `dirs` (by content), and nothing else is. How many there are.
pub fn assert_each_stored_once(dirs: &[PathBuf], clients: usize, count: usize) -> usize {
    let stored = stored_by_content(dirs);
    let mut missing = 0;
    for c in 0..clients {
        for i in 0..count {
            let content = content(c, i);
            match stored.get(&content).map(Vec::len) {
                Some(1) => {}
                Some(n) => panic!("{content:?} is stored {n} times: {:?}", stored[&content]),
                None => missing += 1,
            }
        }
    }
    assert_eq!(missing, 0, "documents missing");
    assert_eq!(stored.len(), clients * count, "documents nobody sent");
    stored.len()
}
