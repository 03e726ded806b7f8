//! [`on_both_backends!`](crate::on_both_backends).

/// Runs each listed test once per backend, as `sqlite::name` and
/// `postgres::name` (the Postgres one returns at once when no test
/// database is configured, as [`spawn_app`](crate::spawn_app) does):
///
/// - `on_both_backends!(a, b)`: each an `async fn(TestApp)` given a
///   [`spawn_app`](crate::spawn_app);
/// - `on_both_backends!(configured by f: a, b)`: the same, on an app whose
///   configuration `f` (a `fn(&mut Config)` of the calling module) changed;
/// - `on_both_backends!(by backend: a, b)`: each an `async fn(Backend)`
///   that starts what it needs itself.
///
/// The tests run on a two-thread Tokio runtime; the calling crate depends
/// on `tokio`.
#[macro_export]
macro_rules! on_both_backends {
    (configured by $configure:ident: $($name:ident),* $(,)?) => {
        $crate::on_both_backends!(@each sqlite, Sqlite, |backend| {
            $crate::spawn_app_with(backend, super::$configure).await
        }: $($name),*);
        $crate::on_both_backends!(@each postgres, Postgres, |backend| {
            $crate::spawn_app_with(backend, super::$configure).await
        }: $($name),*);
    };
    (by backend: $($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await;
                }
            )*
        }
    };
    (@each $module:ident, $backend:ident, |$b:ident| $spawn:block: $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $b = $crate::Backend::$backend;
                    let app = $spawn;
                    let Some(app) = app else {
                        assert_eq!($b, $crate::Backend::Postgres, "SQLite is always there");
                        return;
                    };
                    super::$name(app).await;
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        $crate::on_both_backends!(@each sqlite, Sqlite, |backend| {
            $crate::spawn_app(backend).await
        }: $($name),*);
        $crate::on_both_backends!(@each postgres, Postgres, |backend| {
            $crate::spawn_app(backend).await
        }: $($name),*);
    };
}
