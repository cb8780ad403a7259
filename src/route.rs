//! Routing a request path to an API (longest base path at a segment boundary) and, where the API
//! has resources, to the most specific resource (SPEC 3). Pure: values in, values out.

use std::collections::HashMap;

use crate::model::{Resource, Segment, Template};

/// Base paths to API indexes, looked up by hash for each prefix of the path.
#[derive(Debug, Default)]
pub struct Router {
    by_base: HashMap<String, usize>,
    /// The most segments any base path has: no longer prefix needs a lookup.
    max_segments: usize,
}

impl Router {
    pub fn new<'a>(base_paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut router = Self::default();
        for (i, base) in base_paths.into_iter().enumerate() {
            router.max_segments = router.max_segments.max(base.matches('/').count());
            router.by_base.insert(base.to_owned(), i);
        }
        router
    }

    /// The API whose base path is the longest match for `path`, and the rest of the path after
    /// it (empty or starting with `/`).
    pub fn find<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        // Ends of the candidate prefixes: before each `/` after the first, and the whole path.
        let mut ends = [0usize; 32];
        let mut count = 0;
        for (i, b) in path.bytes().enumerate().skip(1) {
            if b == b'/' {
                if count == self.max_segments || count == ends.len() {
                    break;
                }
                ends[count] = i;
                count += 1;
            }
        }
        if count < self.max_segments && count < ends.len() {
            ends[count] = path.len();
            count += 1;
        }
        ends[..count].iter().rev().find_map(|&end| {
            let api = *self.by_base.get(&path[..end])?;
            Some((api, &path[end..]))
        })
    }
}

/// The outcome of matching a request against an API's resources.
#[derive(Debug, PartialEq, Eq)]
pub enum ResourceMatch {
    /// The API has no resources: everything passes.
    Unrestricted,
    Matched(usize),
    /// The path matches resources, none with this method; the value is for `Allow`.
    MethodNotAllowed(String),
    NotFound,
}

/// Finds the most specific resource for `method` and `rest`: segment by segment, a literal beats
/// `{name}`, which beats `*`. A HEAD request falls back to GET resources.
pub fn match_resource(resources: &[Resource], method: &str, rest: &str) -> ResourceMatch {
    if resources.is_empty() {
        return ResourceMatch::Unrestricted;
    }
    let path = rest.strip_prefix('/').unwrap_or(rest);
    let best_for = |wanted: &str| {
        resources
            .iter()
            .enumerate()
            .filter(|(_, r)| r.method == wanted)
            .filter_map(|(i, r)| Some((specificity(&r.template, path)?, i)))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, i)| i)
    };
    if let Some(i) = best_for(method) {
        return ResourceMatch::Matched(i);
    }
    if method == "HEAD" {
        if let Some(i) = best_for("GET") {
            return ResourceMatch::Matched(i);
        }
    }
    let mut allow: Vec<&str> = resources
        .iter()
        .filter(|r| specificity(&r.template, path).is_some())
        .map(|r| r.method.as_str())
        .collect();
    if allow.is_empty() {
        return ResourceMatch::NotFound;
    }
    allow.sort_unstable();
    allow.dedup();
    ResourceMatch::MethodNotAllowed(allow.join(", "))
}

/// How specifically `template` matches `path` (without its leading `/`), or `None` when it does
/// not. Each segment has a rank, two bits from the top down, so that ranks compare as numbers the
/// way their sequences compare lexicographically: literal 3, `{name}` 2, the template's exact end
/// 1, `*` 0. Templates have at most [`crate::model::MAX_TEMPLATE_SEGMENTS`] segments.
fn specificity(template: &Template, path: &str) -> Option<u128> {
    let mut parts = path.split('/').filter(|s| !s.is_empty());
    let mut rank = 0u128;
    let mut shift: u32 = 126;
    for segment in &template.segments {
        match segment {
            Segment::Rest => return Some(rank),
            Segment::Literal(literal) => {
                if parts.next()? != literal {
                    return None;
                }
                rank |= 3 << shift;
            }
            Segment::Param => {
                parts.next()?;
                rank |= 2 << shift;
            }
        }
        shift = shift.checked_sub(2)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(rank | 1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(method: &str, path: &str) -> Resource {
        Resource {
            api: "a".into(),
            method: method.into(),
            template: path.parse().unwrap(),
            tier: None,
            scopes: vec![],
            no_auth: false,
        }
    }

    #[test]
    fn longest_base_path_at_a_segment_boundary() {
        let router = Router::new(["/pizza", "/pizza/1.0.0", "/a/b/c"]);
        assert_eq!(router.find("/pizza/1.0.0/menu"), Some((1, "/menu")));
        assert_eq!(router.find("/pizza/1.0.0"), Some((1, "")));
        assert_eq!(router.find("/pizza/2.0.0/menu"), Some((0, "/2.0.0/menu")));
        assert_eq!(router.find("/pizzas"), None);
        assert_eq!(router.find("/pizza1.0.0"), None);
        assert_eq!(router.find("/a/b/c/d/e/f"), Some((2, "/d/e/f")));
        assert_eq!(router.find("/a/b"), None);
        assert_eq!(router.find("/"), None);
        assert_eq!(router.find(&"/x".repeat(5000)), None);
    }

    #[test]
    fn most_specific_resource_wins() {
        let resources = [
            resource("GET", "/*"),
            resource("GET", "/menu/{id}"),
            resource("GET", "/menu/special"),
            resource("GET", "/menu/*"),
            resource("POST", "/order/{id}"),
            resource("GET", "/menu"),
        ];
        let m = |method, rest| match_resource(&resources, method, rest);
        assert_eq!(m("GET", "/menu/special"), ResourceMatch::Matched(2));
        assert_eq!(m("GET", "/menu/7"), ResourceMatch::Matched(1));
        assert_eq!(m("GET", "/menu/7/x"), ResourceMatch::Matched(3));
        assert_eq!(m("GET", "/menu"), ResourceMatch::Matched(5));
        assert_eq!(m("GET", "/other"), ResourceMatch::Matched(0));
        assert_eq!(m("GET", ""), ResourceMatch::Matched(0));
        assert_eq!(m("HEAD", "/menu"), ResourceMatch::Matched(5));
        assert_eq!(
            m("DELETE", "/order/7"),
            ResourceMatch::MethodNotAllowed("GET, POST".into())
        );
        let only_post = [
            resource("POST", "/order/{id}"),
            resource("PUT", "/order/{id}"),
        ];
        assert_eq!(
            match_resource(&only_post, "GET", "/order/1"),
            ResourceMatch::MethodNotAllowed("POST, PUT".into())
        );
        assert_eq!(
            match_resource(&only_post, "POST", "/order"),
            ResourceMatch::NotFound
        );
        assert_eq!(
            match_resource(&[], "GET", "/x"),
            ResourceMatch::Unrestricted
        );
    }

    #[test]
    fn exact_end_beats_a_trailing_star() {
        let resources = [resource("GET", "/a/{x}/*"), resource("GET", "/a/{x}")];
        assert_eq!(
            match_resource(&resources, "GET", "/a/b"),
            ResourceMatch::Matched(1)
        );
        assert_eq!(
            match_resource(&resources, "GET", "/a/b/c"),
            ResourceMatch::Matched(0)
        );
    }
}
