fn main() -> std::process::ExitCode {
    abf::cli::tune::main()
}
