//! One string per node name for all the endpoints that name the node: a
//! cluster has tens to thousands of nodes and up to millions of endpoints,
//! and a string per endpoint came to ~30 MiB at 1 000 000 endpoints.

use std::collections::HashSet;
use std::sync::Arc;

/// The node names a source has handed out. Owned by the source's
/// converter of EndpointSlices; a name no endpoint holds any more is
/// dropped at the next sweep.
#[derive(Default)]
pub struct NodeNames {
    names: HashSet<Arc<str>>,
    /// How many names the last sweep kept; the next sweep comes when the
    /// set has doubled, so sweeps cost O(1) per name handed out.
    kept_at_sweep: usize,
}

/// The names are the objects' business, not the set's: a file's objects
/// read the same whichever strings they share.
impl std::fmt::Debug for NodeNames {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("NodeNames")
    }
}

/// Below this many names a sweep is not worth its walk.
const SWEEP_FROM: usize = 64;

impl NodeNames {
    /// The shared string for `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        if self.names.len() >= SWEEP_FROM.max(2 * self.kept_at_sweep) {
            // Only this set holds it: no endpoint names that node any more.
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.kept_at_sweep = self.names.len();
        }
        let shared: Arc<str> = name.into();
        self.names.insert(shared.clone());
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_string_per_name_and_unused_names_are_dropped() {
        let mut names = NodeNames::default();
        let a = names.get("node-a");
        let again = names.get("node-a");
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!Arc::ptr_eq(&a, &names.get("node-b")));
        // Names nobody holds any more are swept: the set stays bounded
        // however many come and go, and a held name keeps its string.
        for i in 0..1000 {
            names.get(&format!("gone-{i}"));
        }
        assert!(names.names.len() <= SWEEP_FROM, "{}", names.names.len());
        assert!(Arc::ptr_eq(&a, &names.get("node-a")));
    }
}
