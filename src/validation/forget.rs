//! What continuous validation forgets: what an agent has been seen to do,
//! after a legitimate change (seed 003), and a firing whose response was
//! never recorded.

use super::{AgentSignals, Learned, Validation};

impl Validation {
    /// Forgets what `agent` (every agent with `None`) has been seen to use,
    /// so a legitimate change of its policy or registry entry is learned
    /// again instead of raising novelties (seed 003). Counting windows are
    /// kept: a burst is a burst whatever the policy says.
    pub fn relearn(&self, agent: Option<&str>) {
        let Ok(mut agents) = self.agents.lock() else {
            return;
        };
        let reset = |a: &mut AgentSignals| {
            a.learned = Learned::default();
            a.dirty = true;
        };
        match agent {
            Some(id) => {
                if let Some(a) = agents.get_mut(id) {
                    reset(a);
                }
            }
            None => agents.values_mut().for_each(reset),
        }
    }

    /// `detector` fired for `agent` but nothing of its response was
    /// recorded (the store failed): it is not kept quiet, so the next
    /// observation that crosses its threshold fires it again.
    pub fn not_fired(&self, agent: &str, detector: &str) {
        let Ok(mut agents) = self.agents.lock() else {
            return;
        };
        if let Some(a) = agents.get_mut(agent) {
            a.quiet_until.remove(detector);
            if let Some(b) = &mut a.learned.baseline {
                b.unmark_fired(detector);
            }
        }
    }
}
