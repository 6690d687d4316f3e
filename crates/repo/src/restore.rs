//! (Contract to be written.)
