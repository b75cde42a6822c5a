//! Small integer ids for map keys (backend and rev-NAT ids) and values
//! kept by them: the Service sync's bookkeeping.

use std::hash::{BuildHasher, Hash};

use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, HashTable};

/// Values by backend id. The ids are dense (`IdAllocator` reuses them), so
/// a Vec indexed by id: with a million backends BTreeMaps keyed by id took
/// about twice the memory.
pub(super) struct ById<V>(Vec<Option<V>>);

impl<V> Default for ById<V> {
    fn default() -> Self {
        ById(Vec::new())
    }
}

impl<V> ById<V> {
    pub(super) fn get(&self, id: &u32) -> Option<&V> {
        self.0.get(*id as usize)?.as_ref()
    }
    pub(super) fn get_mut(&mut self, id: &u32) -> Option<&mut V> {
        self.0.get_mut(*id as usize)?.as_mut()
    }
    pub(super) fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }
    pub(super) fn insert(&mut self, id: u32, value: V) {
        *self.slot(id) = Some(value);
    }
    /// The value of `id`, `V::default()` first if it has none.
    pub(super) fn or_default(&mut self, id: u32) -> &mut V
    where
        V: Default,
    {
        self.slot(id).get_or_insert_with(V::default)
    }
    fn slot(&mut self, id: u32) -> &mut Option<V> {
        let i = id as usize;
        if i >= self.0.len() {
            self.0.resize_with(i + 1, || None);
        }
        &mut self.0[i]
    }
    pub(super) fn remove(&mut self, id: &u32) -> Option<V> {
        self.0.get_mut(*id as usize)?.take()
    }
    pub(super) fn keys(&self) -> impl Iterator<Item = u32> + '_ {
        (0..)
            .zip(&self.0)
            .filter(|(_, v)| v.is_some())
            .map(|(id, _)| id)
    }
}

/// Small integer ids, reused after release; 0 is never handed out.
#[derive(Default)]
pub(super) struct IdAllocator {
    pub(super) next: u32,
    pub(super) free: Vec<u32>,
}

impl IdAllocator {
    pub(super) fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        })
    }
    pub(super) fn give_back(&mut self, id: u32) {
        self.free.push(id);
    }
    pub(super) fn seen(&mut self, id: u32) {
        self.next = self.next.max(id);
    }
}

/// Keys by id and ids by key, for keys that each name one id (backends by
/// address). Each key is stored once: the way from key to id is a hash
/// table of ids, hashed and compared through their keys (a BTreeMap from key
/// to id beside the keys by id took ~25 MB more with a million backends).
pub(super) struct KeyIds<K> {
    keys: ById<K>,
    ids: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl<K> Default for KeyIds<K> {
    fn default() -> Self {
        KeyIds {
            keys: ById::default(),
            ids: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
        }
    }
}

impl<K: Hash + Eq> KeyIds<K> {
    pub(super) fn id(&self, key: &K) -> Option<u32> {
        let keys = &self.keys;
        self.ids
            .find(self.hasher.hash_one(key), |id| keys.get(id) == Some(key))
            .copied()
    }

    pub(super) fn key(&self, id: u32) -> Option<&K> {
        self.keys.get(&id)
    }

    /// Names `key` by `id`. A key already named by another id is named by
    /// `id` from now on; the other id keeps its key until removed.
    pub(super) fn insert(&mut self, id: u32, key: K) {
        self.remove(id);
        let hash = self.hasher.hash_one(&key);
        let keys = &self.keys;
        let hasher = &self.hasher;
        match self.ids.entry(
            hash,
            |other| keys.get(other) == Some(&key),
            |other| keys.get(other).map_or(0, |k| hasher.hash_one(k)),
        ) {
            Entry::Occupied(mut named) => *named.get_mut() = id,
            Entry::Vacant(free) => {
                free.insert(id);
            }
        }
        self.keys.insert(id, key);
    }

    /// Forgets `id` and, if it is the id its key names, the key.
    pub(super) fn remove(&mut self, id: u32) -> Option<K> {
        let key = self.keys.remove(&id)?;
        if let Ok(named) = self
            .ids
            .find_entry(self.hasher.hash_one(&key), |other| *other == id)
        {
            named.remove();
        }
        Some(key)
    }

    /// Keys named by an id.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Every id that has a key.
    pub(super) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_find_both_ways_and_forget_only_what_they_name() {
        let mut ids: KeyIds<(u32, u16)> = KeyIds::default();
        for id in 1..=1000 {
            ids.insert(id, (id * 7, 80));
        }
        assert_eq!(ids.len(), 1000);
        assert_eq!(ids.id(&(7 * 500, 80)), Some(500));
        assert_eq!(ids.key(500), Some(&(3500, 80)));
        assert_eq!(ids.id(&(3500, 81)), None);

        // A second id for a key (maps left by an interrupted apply): the
        // key names the newer one; removing the older keeps that.
        ids.insert(2000, (3500, 80));
        assert_eq!(ids.id(&(3500, 80)), Some(2000));
        assert_eq!(ids.remove(500), Some((3500, 80)));
        assert_eq!(ids.id(&(3500, 80)), Some(2000));
        assert_eq!(ids.remove(2000), Some((3500, 80)));
        assert_eq!(ids.id(&(3500, 80)), None);
        assert_eq!(ids.remove(2000), None);

        // Giving an id another key forgets its old one.
        ids.insert(1, (1, 1));
        assert_eq!(ids.id(&(7, 80)), None);
        assert_eq!(ids.id(&(1, 1)), Some(1));
        assert_eq!(ids.len(), 999);
        assert_eq!(ids.ids().count(), 999);
    }
}
