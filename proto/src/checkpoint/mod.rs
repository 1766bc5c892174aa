//! The checkpoint protocol, in one place for every process that touches a run directory:
//! what a checkpoint holds and where ([`layout`]), how one becomes the run's newest
//! ([`commit`]: the manifest created, `latest` moved under a conditional update), which one a
//! run resumes from after a crash ([`resume`]), and which old ones are deleted
//! ([`retention`]). The coordinator commits and selects; workers write the objects and read
//! them back; tests drive the same functions without either process.

pub mod commit;
pub mod faults;
pub mod layout;
pub mod resume;
pub mod retention;

pub use commit::{CommitError, Committed, Committer};
pub use layout::{CheckpointBytes, TrainerState, MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE};
pub use resume::{select_resume, ResumeError};
