//! `keys …` and `accounts …`: being written.
