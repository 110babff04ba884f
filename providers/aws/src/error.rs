//! AWS SDK errors as provider errors: the AWS error code and message (never
//! secret material), classified as transient or definitive.

use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use keygate_provider_api::ProviderError;

/// Error codes AWS documents as "try again later".
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ServiceFailure",
    "InternalFailure",
    "InternalServiceError",
    "InternalServiceErrorException",
    "IDPCommunicationError",
];

/// The AWS error code of a failed call, if AWS answered at all.
pub(crate) fn code<E, R>(e: &SdkError<E, R>) -> Option<&str>
where
    E: ProvideErrorMetadata,
{
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

/// Maps a failed `operation` (e.g. `sts:AssumeRole`) to a provider error.
pub(crate) fn from_sdk<E, R>(operation: &str, e: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("unknown error");
            let message = err.message().unwrap_or("no message");
            let text = format!("aws `{operation}` failed: {code}: {message}");
            if TRANSIENT_CODES.contains(&code) {
                ProviderError::Unavailable(text)
            } else {
                ProviderError::Refused(text)
            }
        }
        SdkError::ConstructionFailure(_) => ProviderError::Internal(format!(
            "aws `{operation}` could not be built: {}",
            DisplayErrorContext(&e)
        )),
        _ => ProviderError::Unavailable(format!(
            "aws `{operation}` failed: {}",
            DisplayErrorContext(&e)
        )),
    }
}
