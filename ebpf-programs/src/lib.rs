//! Host builds see only this empty library (the agent's build.rs depends on
//! the crate so cargo rebuilds the eBPF object when it changes); the programs
//! live in the `tern-ebpf` binary, built for bpfel-unknown-none.
#![no_std]
