//! The one way a domain's record changes: build the new record from the current one, write it to
//! the store, and only then swap it into memory. A store failure is returned to the caller and
//! leaves memory as it was.

use ferrovirt_api::{ApiError, DomainState, StateReason};

use super::Inner;
use crate::store::StoredDomain;

/// Whether an inactive transient domain is forgotten by a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transient {
    /// It exists only while it runs: delete it from store and memory.
    Forget,
    /// A restart is about to bring it back: keep it.
    Keep,
}

impl Inner {
    /// Store `change` applied to the domain's record, then swap it in. An inactive transient
    /// domain is deleted instead (unless `Transient::Keep`).
    pub(super) fn commit(
        &mut self,
        name: &str,
        transient: Transient,
        change: impl FnOnce(&mut StoredDomain),
    ) -> Result<(), ApiError> {
        self.commit_with(name, transient, None, change)
    }

    /// A start: the record and the consumed domain id in one transaction.
    pub(super) fn commit_started(
        &mut self,
        name: &str,
        id: u32,
        change: impl FnOnce(&mut StoredDomain),
    ) -> Result<(), ApiError> {
        self.commit_with(name, Transient::Keep, Some(id), change)
    }

    fn commit_with(
        &mut self,
        name: &str,
        transient: Transient,
        started_id: Option<u32>,
        change: impl FnOnce(&mut StoredDomain),
    ) -> Result<(), ApiError> {
        let dom = self
            .doms
            .get(name)
            .ok_or_else(|| ApiError::no_domain(name))?;
        let mut stored = dom.stored.clone();
        change(&mut stored);
        if transient == Transient::Forget && !stored.persistent && !stored.state.is_active() {
            self.store.delete(name)?;
            self.doms.remove(name);
            return Ok(());
        }
        match started_id {
            Some(id) => self.store.put_started(&stored, id)?,
            None => self.store.put(&stored)?,
        }
        if let Some(dom) = self.doms.get_mut(name) {
            dom.stored = stored;
        }
        Ok(())
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
