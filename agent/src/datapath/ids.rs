//! Small integer ids for map keys (backend and rev-NAT ids) and values
//! kept by them: the Service sync's bookkeeping.

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
