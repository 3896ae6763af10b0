//! Checks of the SVG plots: tag balance, Python's XML parser, text and polyline
//! extraction.

use std::path::Path;
use std::process::Command;

/// Every `<tag ...>` closed in order (self-closing `/>` counted), one `<svg>` root; and Python's
/// XML parser (the standard library's) accepts the file. No python3: skipped with a note, or a
/// failure under `ABF_REQUIRE_DATA=1`.
pub fn check_svg(svg: &str, path: &Path) {
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..40.min(svg.len())]
    );
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        let end = rest[i..].find('>').expect("unclosed tag") + i;
        let tag = &rest[i + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "bad nesting");
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            stack.push(name);
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    let py = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; E.parse(sys.argv[1])",
        ])
        .arg(path)
        .status();
    match py {
        Ok(status) => assert!(
            status.success(),
            "python's XML parser rejects {}",
            path.display()
        ),
        Err(e) => {
            super::data::skip_or_fail::<()>(format_args!("python3 for the XML check ({e})"));
        }
    }
}

/// The text content of every `<text>` element, trimmed.
pub fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|s| {
            let start = s.find('>')? + 1;
            let end = s.find("</text>")?;
            Some(s[start..end].trim().to_string())
        })
        .collect()
}

/// The number of points of every `<polyline>`.
pub fn polylines(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .filter_map(|s| {
            let p = s.find("points=\"")? + 8;
            let e = s[p..].find('"')? + p;
            Some(s[p..e].split_whitespace().count())
        })
        .collect()
}
