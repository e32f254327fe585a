//! keepnet-driver: the driver server. See `keepnet_driver::server` for what it does and
//! `keepnet_driver::server::Driver::from_boot` for what the supervisor hands it.

fn main() -> std::process::ExitCode {
    keepnet_server::main("driver", |boot| {
        keepnet_driver::Driver::from_boot(boot).map_err(Into::into)
    })
}
