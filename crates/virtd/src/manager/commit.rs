//! The one way a domain's record changes: build the new record from the current one, write it to
//! the store, and only then swap it into memory. A store failure is returned to the caller and
//! leaves memory as it was.
//!
//! The store's lock is the writer lock: whoever changes a record, or adds or removes a domain,
//! holds it from the checks before the change until the swap, so writers never overwrite each
//! other. The domain table's lock is only taken for short moments around the write, never
//! across it (SQLite's fsync can take long): `list`, `dominfo` and the like answer meanwhile.
//! Lock order: the store, then the table; never the store while holding the table.

use std::sync::MutexGuard;

use ferrovirt_api::{ApiError, DomainState, StateReason};

use super::{Dom, Inner, Manager};
use crate::store::{Store, StoredDomain};

/// Whether an inactive transient domain is forgotten by a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transient {
    /// It exists only while it runs: delete it from store and memory.
    Forget,
    /// A restart is about to bring it back: keep it.
    Keep,
}

/// The store, held: the right to change records (see the module's comment).
pub(super) struct Writer<'a> {
    mgr: &'a Manager,
    store: MutexGuard<'a, Store>,
}

impl Manager {
    /// Take the writer lock. Never call this while holding the table's lock.
    pub(super) fn writer(&self) -> Writer<'_> {
        Writer {
            mgr: self,
            store: self.store.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

impl Writer<'_> {
    /// Store `change` applied to the domain's record, then swap it in. An inactive transient
    /// domain is deleted instead (unless `Transient::Keep`).
    pub(super) fn commit(
        &mut self,
        name: &str,
        transient: Transient,
        change: impl FnOnce(&mut StoredDomain),
    ) -> Result<(), ApiError> {
        self.commit_with(name, transient, None, change, |_| {})
    }

    /// `commit`, then `also` on the table in the same moment as the swap (in-memory state
    /// that must change together with the record, such as the VM's generation).
    pub(super) fn commit_and(
        &mut self,
        name: &str,
        transient: Transient,
        change: impl FnOnce(&mut StoredDomain),
        also: impl FnOnce(&mut Inner),
    ) -> Result<(), ApiError> {
        self.commit_with(name, transient, None, change, also)
    }

    /// A start: the record and the consumed domain id in one transaction.
    pub(super) fn commit_started(
        &mut self,
        name: &str,
        id: u32,
        change: impl FnOnce(&mut StoredDomain),
        also: impl FnOnce(&mut Inner),
    ) -> Result<(), ApiError> {
        self.commit_with(name, Transient::Keep, Some(id), change, also)
    }

    fn commit_with(
        &mut self,
        name: &str,
        transient: Transient,
        started_id: Option<u32>,
        change: impl FnOnce(&mut StoredDomain),
        also: impl FnOnce(&mut Inner),
    ) -> Result<(), ApiError> {
        let mut stored = {
            let inner = self.mgr.lock();
            let dom = inner
                .doms
                .get(name)
                .ok_or_else(|| ApiError::no_domain(name))?;
            dom.stored.clone()
        };
        change(&mut stored);
        if transient == Transient::Forget && !stored.persistent && !stored.state.is_active() {
            self.store.delete(name)?;
            let mut inner = self.mgr.lock();
            inner.doms.remove(name);
            also(&mut inner);
            return Ok(());
        }
        match started_id {
            Some(id) => self.store.put_started(&stored, id)?,
            None => self.store.put(&stored)?,
        }
        let mut inner = self.mgr.lock();
        if let Some(dom) = inner.doms.get_mut(name) {
            dom.stored = stored;
        }
        also(&mut inner);
        Ok(())
    }

    /// A new domain: stored, then added to the table.
    pub(super) fn add(&mut self, stored: StoredDomain) -> Result<(), ApiError> {
        self.store.put(&stored)?;
        let name = stored.def.name.clone();
        self.mgr.lock().doms.insert(name, Dom::new(stored));
        Ok(())
    }

    /// A domain gone: deleted from the store, then from the table.
    pub(super) fn remove(&mut self, name: &str) -> Result<(), ApiError> {
        self.store.delete(name)?;
        self.mgr.lock().doms.remove(name);
        Ok(())
    }

    /// Delete the row of a domain already taken out of the table.
    pub(super) fn delete_row(&mut self, name: &str) -> Result<(), ApiError> {
        self.store.delete(name)
    }
}

/// The record of a VM that is gone.
pub(super) fn stopped(
    state: DomainState,
    reason: StateReason,
) -> impl Fn(&mut StoredDomain) + Copy {
    move |s: &mut StoredDomain| {
        s.state = state;
        s.reason = reason;
        s.runtime = None;
    }
}

/// The record of a domain whose state changed while it runs (paused, resumed).
pub(super) fn state(state: DomainState, reason: StateReason) -> impl Fn(&mut StoredDomain) + Copy {
    move |s: &mut StoredDomain| {
        s.state = state;
        s.reason = reason;
    }
}
