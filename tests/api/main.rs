//! End-to-end tests: the real server over real sockets, on SQLite and on
//! Postgres. Postgres variants need `VILVIK_KEYS_TEST_DATABASE_URL`; without
//! it they print that they were skipped (or fail, with
//! `VILVIK_KEYS_REQUIRE_POSTGRES=1`).

mod helpers;

mod audit;
mod auth;
mod bad_input;
mod cluster;
mod connections;
mod encoding;
mod history;
mod lifecycle;
mod matrix;
mod outage;
mod pepper;
mod privilege;
mod protection;
mod rate_limit;
mod retries;
mod tls;
mod tour;

/// Runs each listed test once per backend:
///
/// - `on_both_backends!(a, b)`: each an `async fn(TestApp)` on a default app;
/// - `on_both_backends!(configured by f: a, b)`: the same, on an app whose
///   configuration `f` (a `fn(&mut Config)` of the calling module) changed;
/// - `on_both_backends!(by backend: a, b)`: each an `async fn(Backend)` that
///   starts the app it needs itself.
#[macro_export]
macro_rules! on_both_backends {
    (configured by $configure:ident: $($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::helpers::spawn_app_with($crate::helpers::Backend::Sqlite, super::$configure).await.unwrap();
                    super::$name(app).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(app) = $crate::helpers::spawn_app_with($crate::helpers::Backend::Postgres, super::$configure).await else {
                        return;
                    };
                    super::$name(app).await;
                }
            )*
        }
    };
    (by backend: $($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await;
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::helpers::spawn_app($crate::helpers::Backend::Sqlite).await.unwrap();
                    super::$name(app).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(app) = $crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await else {
                        return;
                    };
                    super::$name(app).await;
                }
            )*
        }
    };
}
