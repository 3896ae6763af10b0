fn main() -> std::process::ExitCode {
    abf::cli::eval::main()
}
