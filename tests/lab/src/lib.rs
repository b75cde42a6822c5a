//! The lab: network namespaces, a cluster made of namespaces running the
//! real binaries, and real traffic. The root integration tests (package
//! tern-tests), the agent's tests, xtask and the benchmark build on it.

pub mod apiserver;
pub mod commands;
pub mod host;
pub mod lab;
pub mod libcni;
pub mod netns;
pub mod skip;
pub mod traffic;

/// Runs each named case once per routing mode, as two root tests in the
/// modules `overlay` and `native`; each calls `super::case("overlay")` or
/// `super::case("native")`.
#[macro_export]
macro_rules! both_routing_modes {
    ($($name:ident),* $(,)?) => {
        $crate::both_routing_modes!(@mode overlay; $($name),*);
        $crate::both_routing_modes!(@mode native; $($name),*);
    };
    (@mode $mode:ident; $($name:ident),*) => {
        mod $mode {
            $(#[test]
            fn $name() -> anyhow::Result<()> {
                if !$crate::skip::require_root(stringify!($name)) {
                    return Ok(());
                }
                super::$name(stringify!($mode))
            })*
        }
    };
}

/// Runs each named case once per Service path, as two root tests in the
/// modules `socket_lb` and `per_packet`; each calls `super::case(arg)` with
/// the argument given for its path (an expression resolved in the module).
#[macro_export]
macro_rules! both_service_paths {
    (socket_lb: $socket_lb:expr, per_packet: $per_packet:expr; $($name:ident),* $(,)?) => {
        $crate::both_service_paths!(@path socket_lb, $socket_lb; $($name),*);
        $crate::both_service_paths!(@path per_packet, $per_packet; $($name),*);
    };
    (@path $module:ident, $arg:expr; $($name:ident),*) => {
        mod $module {
            $(#[test]
            fn $name() -> anyhow::Result<()> {
                if !$crate::skip::require_root(stringify!($name)) {
                    return Ok(());
                }
                super::$name($arg)
            })*
        }
    };
}
