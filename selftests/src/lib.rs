//! Guest framework for the Rust kvm selftests.
